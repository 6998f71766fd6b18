"""Preprocess a cohort on SLURM GPU nodes through dask-jobqueue (a recipe; not run by the tests).

    pip install 'zoompipe[cluster]' dask-jobqueue
    python examples/slurm_cluster.py /shared/slides /shared/pre --jobs 8 --partition gpu

Each SLURM job runs one Dask worker process that owns one GPU and declares it as the Dask
resource ``GPU=1``; zoompipe asks for that resource for every slide, so each GPU takes one
slide at a time, keeps its encoder loaded between slides, and writes to the shared folder. The
slides and the output folder must be on a file system that every node sees at the same path.
Running this twice (or while another run works on the same folder) processes each slide once:
the per-slide locks in ``OUT/locks`` say which host and process holds a slide.
"""

from __future__ import annotations

import argparse

from dask_jobqueue import SLURMCluster
from distributed import Client

from zoompipe.preprocess import PreprocessConfig, preprocess_slides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slides", help="folder of slides, or a CSV with a slide_path column")
    parser.add_argument("out", help="shared output folder")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs, one GPU worker each")
    parser.add_argument("--partition", default="gpu")
    parser.add_argument("--cores", type=int, default=8, help="CPU cores per job (patch readers and the encoder)")
    parser.add_argument("--memory", default="32GB")
    parser.add_argument("--walltime", default="04:00:00")
    args = parser.parse_args()

    cluster = SLURMCluster(
        queue=args.partition, cores=args.cores, processes=1, memory=args.memory, walltime=args.walltime,
        job_extra_directives=["--gres=gpu:1"],
        # One task at a time per worker; the cores go to the patch readers and torch.
        worker_extra_args=["--resources", "GPU=1", "--nthreads", "1"],
        job_script_prologue=[f"export OMP_NUM_THREADS={args.cores}"],
    )
    cluster.adapt(minimum=0, maximum=args.jobs)  # jobs come and go with the work left
    with Client(cluster) as client:
        config = PreprocessConfig(device="cuda", workers=args.cores)
        rows = preprocess_slides([args.slides], args.out, config, cluster=client)
    failed = [r for r in rows if r.status == "failed"]
    print(f"{len(rows) - len(failed)} of {len(rows)} slides done; see {args.out}/status.csv")
    cluster.close()


if __name__ == "__main__":
    main()
