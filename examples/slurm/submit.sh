#!/bin/bash
# Submit the shard array, then a merge that starts once every task has finished successfully.
#   examples/slurm/submit.sh JOBS.yaml [kvbatch run options]
set -euo pipefail
jobs_file=${1:?usage: submit.sh JOBS.yaml [kvbatch run options]}
here=$(dirname "$0")
array=$(sbatch --parsable "$here/kvbatch-array.sbatch" "$@")
merge=$(sbatch --parsable --dependency="afterok:${array}" --job-name=kvbatch-merge --time=01:00:00 \
        --cpus-per-task=2 --output=kvbatch-merge-%j.log --wrap "kvbatch merge ${jobs_file}")
echo "shards: job ${array}; merge: job ${merge} (runs after every shard succeeded)"
