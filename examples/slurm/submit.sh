#!/bin/bash
# Submit the shard array, then a merge that starts once every task has finished successfully.
#   examples/slurm/submit.sh JOBS.yaml [kvbatch run options]
set -euo pipefail
jobs_file=${1:?usage: submit.sh JOBS.yaml [kvbatch run options]}
here=$(dirname "$0")
array=$(sbatch --parsable "$here/kvbatch-array.sbatch" "$@")
# The merge reads the job file as the run does: the same jobs (--job), output folder and spec (--set; --model and
# --limit are --set model= and input.limit=), or it looks for shards that were never written.
merge_cmd=(kvbatch merge "$jobs_file")
shift
while [ $# -gt 0 ]; do
  case $1 in
    --job | -j | --set) merge_cmd+=("$1" "${2-}"); shift ;;
    -[!-]*)  # short options in one word, as the run's parser reads them: flags, then j and its value (-jNAME,
             # -qj NAME, -qjNAME)
      if [[ $1 =~ ^-[vq]*j(.*)$ ]]; then
        if [ -n "${BASH_REMATCH[1]}" ]; then merge_cmd+=(-j "${BASH_REMATCH[1]}"); else merge_cmd+=(-j "${2-}"); shift; fi
      fi ;;
    --job=* | --set=*) merge_cmd+=("$1") ;;
    --model) merge_cmd+=(--set "model=${2-}"); shift ;;
    --model=*) merge_cmd+=(--set "model=${1#--model=}") ;;
    --limit) merge_cmd+=(--set "input.limit=${2-}"); shift ;;
    --limit=*) merge_cmd+=(--set "input.limit=${1#--limit=}") ;;
  esac
  shift || break
done
# --wrap is a command line for /bin/sh: each word quoted, so a path with spaces stays one argument
merge=$(sbatch --parsable --dependency="afterok:${array}" --job-name=kvbatch-merge --time=01:00:00 \
        --cpus-per-task=2 --output=kvbatch-merge-%j.log --wrap "$(printf '%q ' "${merge_cmd[@]}")")
echo "shards: job ${array}; merge: job ${merge} (runs after every shard succeeded)"
