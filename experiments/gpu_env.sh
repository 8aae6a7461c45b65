# Sourced by the H100 scripts (run from the repo root, wheels installed under /tmp/site): $OUT made, the envs/agents
# packages linked under qpolicy/ (removed again when the script exits), offline wandb, caches under /tmp, and $Q, the CLI.
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
ln -sfn ../envs qpolicy/envs; ln -sfn ../agents qpolicy/agents
trap 'rm -f qpolicy/envs qpolicy/agents' EXIT
export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=disabled PYTHONUNBUFFERED=1 QPOLICY_CACHE=/tmp/qcache \
       JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
Q="python3 -m qpolicy.cli"
