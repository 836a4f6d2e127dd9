"""``python -m ringattn.plan``: an alias of the plan inspector, ``python -m ringattn.inspect``.

Guarded, so that importing this module (doctest collection, documentation tools) runs nothing. The
planner itself imports nothing above it: only this entry point reaches up to the inspector.
"""

from ringattn.inspect import main

if __name__ == "__main__":
    main()
