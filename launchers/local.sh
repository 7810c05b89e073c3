#!/usr/bin/env bash
# Train with torchrun on this machine, or on several machines that each run this script.
#
#   launchers/local.sh [OPTIONS] RECIPE [--set section.key=value ...]
#
# One node (default): torchrun --standalone with NPROC processes.
# Several nodes: run the same command on every node with --nnodes N and --head HOST[:PORT];
# torchrun's c10d rendezvous is hosted by the node whose address is HOST (start that one first,
# or at least within the join timeout), node ranks are assigned by the rendezvous. With
# --node-rank R the static rendezvous is used instead (MASTER_ADDR=HOST, fixed node ranks).
#
# Options (each has an environment variable; the option wins):
#   --nproc N        NPROC_PER_NODE  processes on this node. Default: the number of GPUs torch sees
#                                    (torch.cuda.device_count()), or 1 without GPUs.
#   --nnodes N       NNODES          number of nodes (default 1).
#   --head HOST[:PORT] HEAD_ADDR / HEAD_PORT  rendezvous host and port (default port 29500).
#   --node-rank R    NODE_RANK       static rendezvous with this node rank (0 = the head).
#   --rdzv-id ID     RDZV_ID         rendezvous id shared by the nodes of one run (default msllm).
#   --local-addr A   LOCAL_ADDR      this node's address as the other nodes reach it (default: its
#                                    hostname). Needed when the hostname does not resolve to the
#                                    interface the nodes share.
#   --dry-run                        print the torchrun command instead of running it.
#
# Other environment:
#   OMP_NUM_THREADS  threads per process. Default: the CPUs this script may use (nproc) divided by
#                    the processes on this node, at least 1.
#   PYTHON           interpreter that has msllm installed (default python3).
#   MSLLM_MODULE     Python module each rank runs as `python -m MODULE train RECIPE ...`
#                    (default msllm.cli; the integration tests substitute a stand-in).
#   SHUTDOWN_TIMEOUT seconds torchrun gives the ranks to checkpoint and exit after SIGTERM/SIGINT
#                    before it kills them (default 120; TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  network interface for the collectives (multi-node).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

die() {
    echo "local.sh: error: $*" >&2
    exit 2
}

nproc_per_node=${NPROC_PER_NODE:-}
nnodes=${NNODES:-1}
head_addr=${HEAD_ADDR:-}
head_port=${HEAD_PORT:-29500}
node_rank=${NODE_RANK:-}
rdzv_id=${RDZV_ID:-msllm}
local_addr=${LOCAL_ADDR:-}
dry_run=0
python=${PYTHON:-python3}

while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help) usage 0 ;;
    --nproc) nproc_per_node=${2:?--nproc needs a value}; shift 2 ;;
    --nnodes) nnodes=${2:?--nnodes needs a value}; shift 2 ;;
    --head) head_addr=${2:?--head needs HOST[:PORT]}; shift 2 ;;
    --node-rank) node_rank=${2:?--node-rank needs a value}; shift 2 ;;
    --rdzv-id) rdzv_id=${2:?--rdzv-id needs a value}; shift 2 ;;
    --local-addr) local_addr=${2:?--local-addr needs a value}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
    esac
done

[[ $# -ge 1 ]] || usage 2
recipe=$1
shift
[[ -f $recipe ]] || die "recipe file not found: $recipe"

if [[ $head_addr == *:* ]]; then
    head_port=${head_addr##*:}
    head_addr=${head_addr%:*}
fi
[[ $nnodes =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$nnodes'"
if [[ -z $nproc_per_node ]]; then
    # GPUs torch can see on this node (respects CUDA_VISIBLE_DEVICES); 1 process without GPUs.
    nproc_per_node=$("$python" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null) ||
        die "cannot run '$python -c \"import torch\"'; set PYTHON or --nproc"
fi
[[ $nproc_per_node =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc_per_node'"

if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    cpus=$(nproc)
    OMP_NUM_THREADS=$((cpus / nproc_per_node))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}}
# Log lines as they are printed when stdout is a file or a pipe (nohup, tee). msllm.cli already
# line-buffers its own stdout; this also covers torchrun's agent and any other MSLLM_MODULE.
export PYTHONUNBUFFERED=1

cmd=("$python" -m torch.distributed.run --nproc-per-node="$nproc_per_node")
if ((nnodes == 1)) && [[ -z $head_addr ]]; then
    cmd+=(--standalone)
else
    [[ -n $head_addr ]] || die "--nnodes $nnodes needs --head HOST[:PORT] (the rendezvous host)"
    cmd+=(--nnodes="$nnodes")
    if [[ -n $node_rank ]]; then
        cmd+=(--node-rank="$node_rank" --master-addr="$head_addr" --master-port="$head_port")
    else
        cmd+=(--rdzv-backend=c10d --rdzv-endpoint="$head_addr:$head_port" --rdzv-id="$rdzv_id")
    fi
    if [[ -n $local_addr ]]; then
        cmd+=(--local-addr="$local_addr")
    fi
fi
cmd+=(--module "${MSLLM_MODULE:-msllm.cli}" train "$recipe" "$@")

echo "local.sh: OMP_NUM_THREADS=$OMP_NUM_THREADS ${cmd[*]}" >&2
if ((dry_run)); then
    exit 0
fi
exec "${cmd[@]}"
