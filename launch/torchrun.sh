#!/usr/bin/env bash
# Launch `megavlm train` with torchrun on one node or as one node of a multi-node job (docs/launch.md).
#
# usage: launch/torchrun.sh [--dry-run] CONFIG.yaml [key=value ...]
#   Run it once per node (slurm.sbatch does that through srun). Overrides go to `megavlm train` unchanged.
#   --dry-run (or MEGAVLM_DRY_RUN=1): print the torchrun command it would run (shell-quoted) and exit.
#
# Environment (first set one wins; defaults last):
#   NNODES          nodes in the job: NNODES, SLURM_JOB_NUM_NODES, SLURM_NNODES [1]
#   NODE_RANK       this node's rank 0..NNODES-1: NODE_RANK, SLURM_NODEID, GROUP_RANK [0]
#   NPROC_PER_NODE  processes (GPUs) on this node: NPROC_PER_NODE, SLURM_GPUS_ON_NODE, `nvidia-smi -L` count [1]
#   MASTER_ADDR     host of node rank 0, reachable from every node: MASTER_ADDR, else the first host of
#                   SLURM_JOB_NODELIST (scontrol show hostnames); required when NNODES > 1
#   MASTER_PORT     a free TCP port on MASTER_ADDR [29500]
#   RDZV_BACKEND    static: node ranks are NODE_RANK, global rank = NODE_RANK*NPROC_PER_NODE + local rank, so a
#                   TP group of up to NPROC_PER_NODE ranks stays inside a node [static];
#                   c10d: torchrun's elastic rendezvous at MASTER_ADDR:MASTER_PORT with RDZV_ID (node ranks are
#                   assigned on arrival; NODE_RANK is ignored)
#   RDZV_ID         job id for c10d [SLURM_JOB_ID, else megavlm]
#   TORCHRUN        the launcher command, split on spaces [torchrun]; e.g. "python -m torch.distributed.run"
#   TORCHRUN_ARGS   extra torchrun flags, split on spaces (e.g. "--max-restarts 0 --log-dir /logs") []
#   MEGAVLM         the megavlm command for the check below, split on spaces [TORCHRUN's python -m megavlm when
#                   TORCHRUN starts with a python, else megavlm, else python3 -m megavlm]
#   MEGAVLM_CHECK   0 skips that check [1]
# One node without MASTER_ADDR runs `torchrun --standalone` (a free local port).
# Before torchrun starts, `megavlm check CONFIG [key=value ...] --world-size NNODES*NPROC_PER_NODE` runs train's
# checks once (config, run/checkpoint/data directories): a mistake prints one `error: ...` line and exits 2, instead
# of one message per rank followed by torchrun's ChildFailedError traceback. A dry run skips it.
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}

DRY_RUN=${MEGAVLM_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
case "${1:-}" in
  "" | -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'  # this header
    [ -n "${1:-}" ] && exit 0
    exit 2
    ;;
esac
CONFIG=$1
shift
[ -f "$CONFIG" ] || die "config file '$CONFIG' not found"

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-${GROUP_RANK:-0}}}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1 && [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -gt 0 ]; then
    NPROC_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
  else
    NPROC_PER_NODE=1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-static}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-megavlm}}
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # the first line; no `| head` (SIGPIPE under pipefail)
  MASTER_ADDR=${hosts%%$'\n'*}
fi

is_uint "$NNODES" && [ "$NNODES" -ge 1 ] || die "NNODES=$NNODES must be a positive integer"
is_uint "$NODE_RANK" || die "NODE_RANK=$NODE_RANK must be an integer >= 0"
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES (0..$((NNODES - 1)))"
is_uint "$NPROC_PER_NODE" && [ "$NPROC_PER_NODE" -ge 1 ] ||
  die "NPROC_PER_NODE=$NPROC_PER_NODE must be a positive integer"
is_uint "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] ||
  die "MASTER_PORT=$MASTER_PORT must be a TCP port (1..65535)"

read -r -a launcher <<<"${TORCHRUN:-torchrun}"
read -r -a extra <<<"${TORCHRUN_ARGS:-}"
cmd=("${launcher[@]}" --nproc-per-node "$NPROC_PER_NODE")
if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  cmd+=(--standalone)
else
  [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$NNODES needs MASTER_ADDR (the host of node rank 0), or a Slurm job"
  case "$RDZV_BACKEND" in
    static)
      cmd+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
      ;;
    c10d)
      cmd+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
      ;;
    *) die "RDZV_BACKEND=$RDZV_BACKEND is not valid; choose static or c10d" ;;
  esac
fi
cmd+=("${extra[@]}" -m megavlm train "$CONFIG" "$@")

if [ "$DRY_RUN" != 1 ] && [ "${MEGAVLM_CHECK:-1}" != 0 ]; then
  if [ -n "${MEGAVLM:-}" ]; then
    read -r -a megavlm <<<"$MEGAVLM"
  elif [[ $(basename "${launcher[0]}") == python* ]]; then
    megavlm=("${launcher[0]}" -m megavlm)  # the interpreter the ranks will run
  elif command -v megavlm >/dev/null 2>&1; then
    megavlm=(megavlm)
  else
    megavlm=(python3 -m megavlm)
  fi
  # Exit status 2 is a mistake the check found (it printed the `error:` line); any other failure means the check
  # could not run here, and the ranks still check everything themselves. Its stdout (the layout) goes to stderr.
  status=0
  "${megavlm[@]}" check "$CONFIG" "$@" --world-size "$((NNODES * NPROC_PER_NODE))" >&2 || status=$?
  [ "$status" -ne 2 ] || exit 2
  [ "$status" -eq 0 ] ||
    echo "warning: '${megavlm[*]} check' could not run (exit status $status); the ranks check the config themselves" >&2
fi

echo "[launch] node ${NODE_RANK}/${NNODES} on ${HOSTNAME:-$(uname -n)}: ${NPROC_PER_NODE} processes," \
  "rendezvous ${MASTER_ADDR:-standalone}${MASTER_ADDR:+:$MASTER_PORT}" >&2
if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
