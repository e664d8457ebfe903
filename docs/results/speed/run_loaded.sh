#!/bin/bash
# Same as docs/results/speed/run.sh, with another 1-thread cpu-demo training on the machine (a shared box).
mkdir -p "${OUT:-runs/speed-loaded}" && cd "${OUT:-runs/speed-loaded}"
S=${SYNCO:-synco}
rm -rf load; $S pretrain --no-progress --out load threads=1 > load.log 2>&1 &
LOAD=$!
sleep 20
COMMON="epochs=4 knn_every=0 knn_at_end=false log_every=11"
for rep in 1 2 3; do
  for v in device1 workers; do
    case $v in
      device1) O="threads=1";;
      workers) O="threads=1 data.augment.on=workers data.num_workers=1";;
    esac
    rm -rf $v-$rep
    /usr/bin/time -f "%e %U %S" -o $v-$rep.time $S pretrain --no-progress --out $v-$rep $COMMON $O > $v-$rep.log 2>&1
    echo "$v $rep $(python3 -c "import json;s=json.load(open('$v-$rep/summary.json'));print(round(s['images_per_second'],1), round(s['train_seconds'],1))") $(cat $v-$rep.time)"
  done
done
kill $LOAD
