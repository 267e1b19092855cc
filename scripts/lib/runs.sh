# What the result scripts (fashion_mnist.sh, fashion_mnist_longer.sh, fashion_mnist_wider.sh, fashion_mnist_bf16.sh,
# fashion_mnist_crops.sh, fashion_mnist_view.sh, small_data.sh, small_data_pixels.sh, scan_fashion_mnist.sh) share:
# refusing code that no commit holds and an output folder that would resume other code's runs, timing each training,
# scoring a run and raw pixels, and keeping the records that results/runs/ holds.
# Sourced by those scripts, from the repository root, by fashion_mnist_tries.sh for fail and timed and by
# small_data_tries.sh for require_empty_out; SCRIPT names the caller (begin_study sets it; a script that does not call
# it sets SCRIPT itself).

fail() {
  echo "$SCRIPT: error: $1" >&2
  exit 2
}

# Sets `commit` and `dirty` (true when tracked files outside results/, or results/published.csv, differ from it:
# allowed only with FORCE=1; the result scripts rewrite the rest of results/, as config.CODE_PATHS says for the runs'
# records). The calling script itself must be in the commit: the records name it as their maker.
require_committed_code() {
  commit=$(git rev-parse HEAD 2>/dev/null) || fail "not a git checkout: the results could not name their code"
  git cat-file -e "HEAD:scripts/$SCRIPT" 2>/dev/null \
    || fail "scripts/$SCRIPT is not in commit ${commit:0:12}: commit it, so that the records it keeps name their maker"
  local changed
  changed=$(git status --porcelain --untracked-files=no -- . ':(exclude)results'
           git status --porcelain --untracked-files=no -- results/published.csv)
  dirty=false
  if [ -n "$changed" ]; then
    [ "${FORCE:-0}" = 1 ] || fail "$(echo "$changed" | wc -l) tracked file(s) differ from commit ${commit:0:12} \
(git status): commit them, or FORCE=1 to run anyway with the runs marked dirty"
    dirty=true
  fi
}

wait_for_queues() {  # wait_for_queues PID...: every queue started with `&`; fails, keeping nothing, if any failed
  # (`wait $a && wait $b` would go on to keep records and build tables after queue a failed, and leave b running)
  local pid failed=0
  for pid in "$@"; do
    wait "$pid" || failed=1
  done
  [ "$failed" = 0 ] || fail "a run or an evaluation failed (its log in $OUT/ says which); nothing was kept"
}

require_empty_out() {
  if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    fail "OUT=$OUT is not empty: remove it or choose another OUT (its runs would resume, made by other code)"
  fi
}

timed() {  # timed NAME COMMAND...: run it, appending its output to $OUT/NAME.log and adding its wall time to
  # $OUT/NAME.time (a script started again on its OUT, as scan_fashion_mnist.sh may be, sums its starts)
  local name=$1 start=$SECONDS before=0
  shift
  [ -f "$OUT/$name.time" ] && before=$(cat "$OUT/$name.time")
  "$@" >> "$OUT/$name.log" 2>&1 || fail "$name: $2 failed (exit $?): see $OUT/$name.log"
  echo "$((before + SECONDS - start))" > "$OUT/$name.time"
}

evaluate_run() {  # evaluate_run RUN [eval_knn flags...]: kNN at k=200 and k=20, then the run's clustering (PY)
  local run=$1
  shift
  $PY eval_knn.py --run "$run" --device cpu --skip_recorded true --k 200 20 "$@"
  $PY eval_cluster.py --run "$run" --device cpu --skip_recorded true
}

evaluate() {  # evaluate RUN_OR_BASELINE_FLAGS...: kNN at k=20 and k=200, k-means with as many clusters as classes
  $PY eval_knn.py --device cpu --k 20 200 "$@"
  $PY eval_cluster.py --device cpu "$@"
}

evaluate_pixels() {  # evaluate_pixels DATASET [FLAGS...]: its raw pixels scored as evaluate_run scores a run, into
  # $OUT/pixels (FLAGS, e.g. a view, for both programs)
  local dataset=$1
  shift
  $PY eval_knn.py --baseline pixels --dataset "$dataset" --output_dir "$OUT/pixels" --device cpu --k 200 20 "$@"
  $PY eval_cluster.py --baseline pixels --dataset "$dataset" --output_dir "$OUT/pixels" --device cpu "$@"
}

keep_run() {  # keep_run NAME DEST: a training run's config, logs and metrics, what it printed and its wall time
  mkdir -p "$2"
  cp "$OUT/$1/config.yaml" "$OUT/$1/train_log.jsonl" "$OUT/$1/metrics.jsonl" "$2/"
  cp "$OUT/$1.log" "$2/output.log"
  cp "$OUT/$1.time" "$2/train_wall_seconds"
}

keep_baseline() {  # keep_baseline NAME DEST: a baseline's metrics and what it printed
  mkdir -p "$2"
  cp "$OUT/$1/metrics.jsonl" "$2/"
  cp "$OUT/$1.log" "$2/output.log"
}

write_provenance() {  # write_provenance FILE: the script, its commit, whether the tree was dirty, start and end
  printf '{"script": "%s", "git_commit": "%s", "git_dirty": %s, "started": "%s", "finished": "%s"}\n' \
    "scripts/$SCRIPT" "$commit" "$dirty" "$started" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$1"
}

# The records and tables a script keeps replace the old ones only once all of them are written: a failed copy or
# collect_results.py, or Ctrl-C, leaves results/ as it was (what was staged stays in $OUT, where no table reads it).
stage_keep() {  # stage_keep DEST: the records go to STAGE ($OUT/kept.partial, emptied), collect_staged's tables to
  # STAGED_TABLES ($OUT/tables.partial); replace_kept puts them in place
  KEPT=$1 STAGE=$OUT/kept.partial STAGED_TABLES=$OUT/tables.partial
  rm -rf "$STAGE" "$STAGED_TABLES"
  mkdir -p "$STAGE"
}

collect_staged() {  # collect_staged COLLECT_RESULTS_FLAGS...: provenance.json into $STAGE, then its tables (the flags
  # write them below $STAGED_TABLES)
  write_provenance "$STAGE/provenance.json"
  $PY collect_results.py --root "$STAGE" "$@"
}

replace_kept() {  # each file or folder in $STAGED_TABLES replaces its namesake in results/, then $STAGE replaces $KEPT
  local entry
  if [ -d "$STAGED_TABLES" ]; then
    mkdir -p results
    # collect_results.py's list of the tables it wrote in the staged folder: not results/' own (the other studies'
    # tables there are no stale ones of this one)
    rm -f "$STAGED_TABLES/.tables_by_collect_results"
    for entry in "$STAGED_TABLES"/*; do
      rm -rf "results/${entry##*/}"
      mv "$entry" results/
    done
    rmdir "$STAGED_TABLES"
  fi
  rm -rf "$KEPT"
  mkdir -p "$(dirname "$KEPT")"
  mv "$STAGE" "$KEPT"
}

keep_runs_and_pixels() {  # keep_runs_and_pixels RUN...: $KEEP replaced by the runs' records, the pixel baseline's and
  # provenance.json; then that copy's tables and curves, without published numbers, in results/<$KEEP's name>/
  stage_keep "$KEEP"
  local name
  for name in "$@"; do
    keep_run "$name" "$STAGE/$name"
  done
  keep_baseline pixels "$STAGE/pixels"
  collect_staged --out "$STAGED_TABLES/$(basename "$KEEP")" --published ''
  replace_kept
}

begin_study() {  # begin_study STUDY: OUT (default runs/STUDY), KEEP=results/runs/STUDY, one thread per process; refuses
  # uncommitted code and a non-empty OUT; notes the start time
  SCRIPT=$1.sh
  # A failing command (an evaluation, whose output goes to a log) says so on the terminal, in a queue too, and
  # inside a block whose stderr goes to a log: the message goes to the script's own stderr, kept as fd 3.
  exec 3>&2
  set -E
  trap 'echo "$SCRIPT: error: a command failed (exit $?) at line $LINENO of ${BASH_SOURCE[0]}; see the logs in" \
    "$OUT/" >&3' ERR
  OUT=${OUT:-runs/$1}
  KEEP=results/runs/$1
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  require_committed_code
  require_empty_out
  started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  mkdir -p "$OUT"
}
