"""`python -m drpt_ray.run --spec SPEC.yaml [--address ADDR]`: the job entry point Ray Jobs and
KubeRay RayJobs call (same as `drpt-ray run`)."""

import argparse
import sys

from drpt_ray.cli import main


def entry(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m drpt_ray.run")
    p.add_argument("--spec", required=True, help="YAML file with a JobSpec")
    p.add_argument("--address", help="Ray cluster address (default: local Ray)")
    p.add_argument("--output-dir", help="override output_dir")
    a = p.parse_args(argv)
    args = ["run", a.spec] + (["--address", a.address] if a.address else []) + (["--output-dir", a.output_dir] if a.output_dir else [])
    return main(args)


if __name__ == "__main__":
    sys.exit(entry())
