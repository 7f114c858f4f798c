# shellcheck shell=bash
# Shared body of slurm/train_gpu.sbatch and slurm/train_cpu.sbatch (sourced, not run): one srun
# task per node runs the project's launcher (`python -m pretrain.launch`: torchrun's elastic agent,
# after checking the config; a bad config ends the job with one error block), which starts
# NPROC_PER_NODE ranks of `python -m pretrain.train`; the launchers meet in a c10d rendezvous on the
# first node of the allocation.
#
# Expects from the sourcing script: REPO_DIR (the repository root), NPROC_PER_NODE, and the
# training arguments in "$@".
# Optional environment:
#   RUN_DIR       run directory (default: pretrain.train's runs/<config name>); a requeued job runs
#                 the same command in the same directory and resumes from its latest checkpoint
#   NODES         node count the job was planned for; the job fails if SLURM gave another
#   MASTER_ADDR   rendezvous host (default: first node of the allocation)
#   MASTER_PORT   rendezvous port (default: 20000 + job id mod 20000)
#   PYTHON        interpreter (default: .venv/bin/python if present, else python3)
#   STOP_TIMEOUT  seconds the launcher gives its ranks to checkpoint and exit after a stop signal
#                 (default 110: less than the 120 s of --signal=B:USR1@120)
#   REQUEUE       1 (default): after a time-limit stop (SIGUSR1), or a hang the step watchdog ended
#                 (status 75), requeue the job so it resumes
#
# Stop and resume. SIGUSR1 from `--signal=B:USR1@T` reaches this batch shell only; the trap passes
# it to srun, srun to each launcher, the launcher to its ranks (--signals-to-handle), and every rank
# checkpoints after its current step and exits 0; then the job requeues itself. `scontrol requeue`,
# `scancel` and preemption send SIGTERM to every process of the job instead: the ranks checkpoint
# the same way (within the cluster's KillWait, after which SLURM sends SIGKILL), and this shell
# waits for srun to return before it exits.

set -euo pipefail

cd "${REPO_DIR}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

NNODES="${SLURM_JOB_NUM_NODES:?not inside a SLURM job: submit this script with sbatch}"
if [[ -n "${NODES:-}" && "${NODES}" != "${NNODES}" ]]; then
    echo "error: the job was planned for NODES=${NODES} nodes but SLURM allocated ${NNODES}" \
         "(SLURM_JOB_NUM_NODES); resubmit with --nodes=${NODES} or re-plan with python -m pretrain.plan" >&2
    exit 2
fi
if ! [[ "${NPROC_PER_NODE}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NPROC_PER_NODE='${NPROC_PER_NODE}' is not a positive number of ranks per node" >&2
    exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n1)}"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
STOP_TIMEOUT="${STOP_TIMEOUT:-110}"
REQUEUE="${REQUEUE:-1}"

train_args=("$@")
if [[ -n "${RUN_DIR:-}" ]]; then
    train_args+=(--run-dir "${RUN_DIR}")
fi

echo "[launch] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
     "${NNODES} node(s) x ${NPROC_PER_NODE} rank(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}," \
     "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "[launch] python -m pretrain.train ${train_args[*]}"
env | grep -E '^(NCCL|GLOO|TORCH_NCCL|CUDA_DEVICE_MAX_CONNECTIONS|OMP_NUM_THREADS)' \
    | sort | sed 's/^/[launch] /' || true

stop_signal=""
srun_pid=""
on_usr1() {
    stop_signal=USR1
    echo "[launch] SIGUSR1: asking the ranks to checkpoint and stop"
    if [[ -n "${srun_pid}" ]]; then kill -USR1 "${srun_pid}" 2>/dev/null || true; fi
}
on_term() {
    stop_signal=TERM
    echo "[launch] SIGTERM: the ranks checkpoint and stop; waiting for them"
}
trap on_usr1 USR1
trap on_term TERM

srun --nodes="${NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "${PYTHON}" -m pretrain.launch \
        --nnodes="${NNODES}" --nproc-per-node="${NPROC_PER_NODE}" \
        --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${SLURM_JOB_ID}" \
        --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${STOP_TIMEOUT}" \
        -m pretrain.train "${train_args[@]}" &
srun_pid=$!

# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has exited.
status=0
while true; do
    set +e
    wait "${srun_pid}"
    status=$?
    set -e
    kill -0 "${srun_pid}" 2>/dev/null || break
done

if [[ "${stop_signal}" == USR1 ]]; then
    if [[ "${REQUEUE}" == 1 ]]; then
        echo "[launch] stopped before the time limit; requeueing job ${SLURM_JOB_ID} to resume"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    exit 0
fi
if [[ "${status}" == 75 && "${REQUEUE}" == 1 ]]; then
    # A rank's step watchdog found a hang (megatron_ext/training/watchdog.py): requeue, resume.
    echo "[launch] a rank hung (status 75, its report is above); requeueing job ${SLURM_JOB_ID} to resume"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
echo "[launch] srun exited with status ${status}"
exit "${status}"
