"""Waits until the gateway answers a prediction (the seed's curl); prints how long it took.

    python3 infra/docker/wait_gateway.py http://127.0.0.1:8080 300

Standard library only: `make compose-up` runs it with the system's python3.
"""

import json
import sys
import time
import urllib.error
import urllib.request


def answers(gateway: str) -> bool:
    req = urllib.request.Request(
        f"{gateway}/predict",
        data=json.dumps({"features": [0.0] * 16}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    gateway, timeout_s = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 300
    t0 = time.monotonic()
    while not answers(gateway):
        if time.monotonic() - t0 > timeout_s:
            print(f"the gateway at {gateway} did not answer within {timeout_s:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"the gateway at {gateway} answered {time.monotonic() - t0:.1f} s after the containers started")
    return 0


if __name__ == "__main__":
    sys.exit(main())
