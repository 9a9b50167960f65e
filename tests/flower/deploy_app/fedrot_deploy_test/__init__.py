"""The deployment-engine test app: its modules import the test helpers from FEDROT_TESTS_DIR."""
import os
import sys

for _path in (os.environ["FEDROT_TESTS_DIR"], os.path.join(os.environ["FEDROT_TESTS_DIR"], "flower")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
