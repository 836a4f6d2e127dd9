"""``python -m ringattn.plan``: the plan inspector (see :mod:`ringattn.report`)."""
from ringattn.report import main

main()
