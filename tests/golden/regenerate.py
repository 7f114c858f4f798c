"""Rewrite golden_values.json from the current code (after a deliberate compute change), recording
the environment the values were taken in.

    python -m tests.golden.regenerate
"""

import json
import tempfile

from megatron_ext.testing.distributed import run_distributed
from tests.golden.cases import GOLDEN_FILE, case_configs, environment, run_case


def main() -> None:
    cases = {}
    for name, config in case_configs().items():
        with tempfile.TemporaryDirectory() as run_dir:
            cases[name] = run_distributed(run_case, 2, None, config=config, run_dir=run_dir, timeout=900)[0]
        print(f"{name}: {len(cases[name])} steps, final loss {cases[name][-1]['loss']!r}")
    values = {"environment": run_distributed(environment, 2, None)[0], "cases": cases}
    GOLDEN_FILE.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE}")
    for key, value in values["environment"].items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
