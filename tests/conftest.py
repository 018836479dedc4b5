import os
import sys

# tests import their helpers (torch_reference, ...) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
