#!/bin/bash
# Issue 11: the whole default run (cpu-demo, 60 epochs, k-NN at the end), device views with 2 threads vs the
# per-image pipeline in 1 DataLoader worker + 1 thread (the same 2 cores), 3 seeds, one run at a time,
# alternating. Prints seed, variant, images/s of the training loop, training seconds, k-NN top-1 (k=20).
S=${SYNCO:-synco}
mkdir -p "${OUT:-runs/speed-seeds}" && cd "${OUT:-runs/speed-seeds}"
for seed in 0 1 2; do
  for v in device2 workers; do
    case $v in
      device2) O="threads=2";;
      workers) O="threads=1 data.augment.on=workers data.num_workers=1";;
    esac
    rm -rf $v-$seed
    $S pretrain --no-progress --out $v-$seed seed=$seed $O > $v-$seed.log 2>&1
    echo "$seed $v $(python3 -c "import json;s=json.load(open('$v-$seed/summary.json'));print(round(s['images_per_second'],1), round(s['train_seconds'],1), round(s['knn']['20']['top1'],2))")"
  done
done
