"""The test runner for scripts under the MicroPython unix port (no pytest there).

run(TESTS) calls each test, prints PASS/FAIL per test and the traceback of a failure, then
`ALL OK n`, or `FAILED n` and exit status 1. The CPython tests assert on that output.
"""

import sys


def run(tests):
    failed = 0
    for t in tests:
        try:
            t()
            print("PASS", t.__name__)
        except Exception as e:
            failed += 1
            print("FAIL", t.__name__, repr(e))
            if hasattr(sys, "print_exception"):
                sys.print_exception(e)
    if failed:
        print("FAILED", failed)
        sys.exit(1)
    print("ALL OK", len(tests))
