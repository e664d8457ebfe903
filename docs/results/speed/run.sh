#!/bin/bash
# Issue 11: whole-loop throughput of short cpu-demo runs, the variants alternating, 3 rounds.
#   bash run.sh             idle machine: three variants, then the efficiency breakdowns (loop_img_per_s.txt)
#   LOADED=1 bash run.sh    shared machine: another 1-thread training runs throughout; device vs workers
#                           (loop_img_per_s_loaded.txt)
#   OLD_TREE=DIR bash run.sh   adds "filed": the loop as the issue was filed (a checkout of 8fd4217 in DIR, whose
#                           only path was the workers one), with this recipe's shapes in its config keys
S=${SYNCO:-synco}
VARIANTS="device1 device2 workers"
if [ -n "$LOADED" ]; then VARIANTS="device1 workers"; fi
if [ -n "$OLD_TREE" ]; then VARIANTS="$VARIANTS filed"; fi
mkdir -p "${OUT:-runs/speed${LOADED:+-loaded}}" && cd "${OUT:-runs/speed${LOADED:+-loaded}}"
if [ -n "$LOADED" ]; then
  rm -rf load; $S pretrain --no-progress --out load threads=1 > load.log 2>&1 &
  LOAD=$!
  trap 'kill $LOAD 2>/dev/null' EXIT
  sleep ${LOAD_WARMUP_S:-20}
fi
COMMON="epochs=4 knn_every=0 knn_at_end=false log_every=11"
for rep in 1 2 3; do
  for v in $VARIANTS; do
    case $v in
      device1) O="threads=1";;
      device2) O="threads=2";;
      workers) O="threads=1 data.augment.on=workers data.num_workers=1";;
    esac
    rm -rf $v-$rep
    if [ $v = filed ]; then
      /usr/bin/time -f "%e %U %S" -o $v-$rep.time env PYTHONPATH="$OLD_TREE" python3 -m synco pretrain --no-progress \
        --out $v-$rep epochs=4 knn_at_end=false log_every=11 threads=1 data.num_workers=1 optim.batch_size=64 \
        contrast.queue_size=128 negatives.n_hard=32 contrast.momentum_start=0.9 optim.base_lr=1e-2 \
        "data.crop_scale=[0.5,1.0]" > $v-$rep.log 2>&1
    else
      /usr/bin/time -f "%e %U %S" -o $v-$rep.time $S pretrain --no-progress --out $v-$rep $COMMON $O > $v-$rep.log 2>&1
    fi
    echo "$v $rep $(python3 -c "import json;s=json.load(open('$v-$rep/summary.json'));print(round(s['images_per_second'],1), round(s['train_seconds'],1))") $(cat $v-$rep.time)"
  done
done
[ -n "$LOADED" ] && exit 0
for v in workers device device2; do
  case $v in
    workers) O="threads=1 data.augment.on=workers data.num_workers=1";;
    device) O="threads=1";;
    device2) O="threads=2";;
  esac
  $S eval efficiency --methods synco --steps 30 --out eff-$v inputs=loader $O > eff-$v.log 2>&1
  tail -12 eff-$v.log
done
