"""The commands about devices: what a study would run on (`doctor`), and measuring a GPU
(`gpu-check`, which `make gpu-check` runs through gpu/check.sh).

Each handler imports what it runs when it runs, so that `digitune --help` answers without
loading a backend.
"""

from __future__ import annotations

import argparse

from digitune import config
from digitune.cli import tuning


def add_commands(commands) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="say what a study would run on: backend, devices, precision, workers, and why",
    )
    tuning.add_study_arguments(doctor)
    doctor.set_defaults(handler=_doctor)

    gpu_check = commands.add_parser(
        "gpu-check",
        help="on a GPU: throughput at three batch sizes and the default study, time-boxed",
        description="What `make gpu-check` runs (gpu/check.sh): the trainer's throughput on "
        "the default study's network at batch 128, 512 and 2048, then the default study for "
        "--minutes; writes summary.json, summary.md, trials.csv, throughput.csv and the best "
        "trial (best.json, best.weights.h5, for `digitune register --bundle`) to --out.",
    )
    gpu_check.add_argument("--out", required=True, help="the folder to write the results to")
    gpu_check.add_argument(
        "--minutes", type=float, default=4.0, help="the study's time box (default: %(default)s)"
    )
    gpu_check.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: 6 per GPU, or 2)"
    )
    gpu_check.add_argument(
        "--cpu",
        action="store_true",
        help="a small dry run on the CPU: the same steps, on few images, for CI",
    )
    gpu_check.set_defaults(handler=_gpu_check)


def _doctor(args: argparse.Namespace) -> int:
    from digitune import backend, study_file
    from digitune.engines import parallel

    definition = study_file.load(args.study)
    name, why = backend.resolved(definition.training.backend)
    described = backend.describe(definition.training.precision)
    installed = [each for each in backend.BACKENDS if backend.installed(each)]
    gpus = [device for device in backend.devices(name) if device.kind == "gpu"]
    workers = definition.study.workers
    sharing = (
        f"{workers} on {len(gpus)} GPU(s), in turn"
        if gpus
        else f"{workers}, {parallel.thread_share(workers)} CPU thread(s) each"
    )
    rows = {
        "study": f"{definition.study.name} ({definition.path})",
        "backend": f"{described['backend']} ({why}); installed: {', '.join(installed)}",
        "devices": described["devices"],
        "precision": f"{definition.training.precision} -> {described['precision']} "
        f"({described['precision_why']})",
        "NVIDIA GPUs": ", ".join(backend.nvidia_gpus()) or "none (no nvidia-smi, or no GPU)",
        "workers": sharing,
        "compile cache": str(config.compilation_cache_dir() or "off") if name == "jax" else "-",
    }
    for key, value in rows.items():
        print(f"{key:14s} {value}")
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from digitune.bench import gpu

    summary = gpu.check(args.out, minutes=args.minutes, workers=args.workers, cpu=args.cpu)
    print(gpu.as_text(summary))
    return 0
