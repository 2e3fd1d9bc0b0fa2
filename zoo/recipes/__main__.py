import sys

from qpasses_zoo.recipes import main

sys.exit(main())
