"""Moved to ``standins.netns`` (the sandbox and the demo use it too); kept for the tests' imports."""

from standins.netns import *  # noqa: F403
from standins.netns import main

if __name__ == "__main__":
    main()
