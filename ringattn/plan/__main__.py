"""``python -m ringattn.plan``: the plan inspector (see :mod:`ringattn.report`).

Guarded, so that importing this module (doctest collection, documentation tools) runs nothing.
"""
from ringattn.report import main

if __name__ == "__main__":
    main()
