import sys

from zoo.recipes import main

sys.exit(main())
