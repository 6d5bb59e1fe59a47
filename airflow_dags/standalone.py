"""``make airflow``: Airflow standalone on 127.0.0.1 with this project's DAGs.

Run with the Python of ``.venv-airflow``. Its state (database, logs, generated password) lives
in ``$AIRFLOW_HOME`` (default ``<project>/.airflow``); the API server and UI listen on
``127.0.0.1:$AIRFLOW_PORT`` (default 8080). The Spark connection ``recsys_spark`` is created
pointing at ``local[*]`` when it does not exist yet (change it in the UI, Admin > Connections).
Ctrl-C (or SIGTERM) stops every Airflow process it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def environment() -> dict[str, str]:
    home = Path(os.environ.get("AIRFLOW_HOME") or PROJECT / ".airflow").resolve()
    port = os.environ.get("AIRFLOW_PORT", "8080")
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "airflow_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": port,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def main() -> int:
    env = environment()
    home, port = Path(env["AIRFLOW_HOME"]), env["AIRFLOW__API__PORT"]
    home.mkdir(parents=True, exist_ok=True)
    airflow = [str(Path(sys.executable).parent / "airflow")]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    known = subprocess.run([*airflow, "connections", "get", "recsys_spark"], env=env, capture_output=True)
    if known.returncode != 0:
        subprocess.run([*airflow, "connections", "add", "recsys_spark", "--conn-type", "spark",
                        "--conn-host", "local[*]"], env=env, check=True, stdout=subprocess.DEVNULL)
    # In this process group: Ctrl-C reaches every component, and so does a signal to the group.
    standalone = subprocess.Popen([*airflow, "standalone"], env=env)
    signal.signal(signal.SIGTERM, lambda *_: standalone.send_signal(signal.SIGINT))
    try:
        url = f"http://127.0.0.1:{port}"
        while standalone.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2):  # noqa: S310 - ours
                    break
            except OSError:
                time.sleep(2)
        if standalone.poll() is None:
            passwords = home / "simple_auth_manager_passwords.json.generated"
            password = json.loads(passwords.read_text())["admin"] if passwords.is_file() else "(see above)"
            print(f"\nAirflow is up: {url}  (log in as admin, password {password}; it is kept in {passwords})\n"
                  f"DAGs: recsys_daily, recsys_nearline ({PROJECT / 'airflow_dags'}). Ctrl-C stops Airflow.\n",
                  flush=True)
        return standalone.wait()
    except KeyboardInterrupt:  # the components got the SIGINT too; standalone stops the rest
        return standalone.wait()


if __name__ == "__main__":
    sys.exit(main())
