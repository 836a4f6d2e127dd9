"""``python -m ringattn.cost --calibrate``: measure this machine and write a profile JSON (:mod:`.calibrate`)."""

from ringattn.cost.calibrate import main

if __name__ == "__main__":
    main()
