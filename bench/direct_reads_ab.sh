#!/bin/bash
# A/B of two vmd source trees, each daemon serving a 2-way mirror (as shipped:
# writeback_cache, direct_io: false) behind its own loop device; fio psync
# direct=1 on the loop devices, targets alternating within each round.
# usage: direct_reads_ab.sh BASE_SRC NEW_SRC ROUNDS   (root; writes under $W)
# Prints one line per run: job tree iops cpu_us_per_request.
set -u
BASE=$1 NEW=$2 R=$3
W=${W:-/tmp/dread/ab}
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
declare -A SRC=([base]=$BASE [new]=$NEW)
T="base new"
cleanup() { for t in $T; do d=$W/$t
  [ -s $d/loop ] && losetup -d $(cat $d/loop); [ -s $d/pid ] && kill $(cat $d/pid)
  for i in $(seq 50); do mountpoint -q $d/mnt || break; sleep 0.2; done; done; }
trap cleanup EXIT
for t in $T; do
  d=$W/$t; rm -rf $d; mkdir -p $d/mnt
  cat > $d/vmd.yaml <<YAML
mountpoint: mnt
socket: vmd.sock
writeback_cache: true
volumes:
  vol0:
    size: 512MiB
    plexes: [p0.img, p1.img]
    log: vol0.log
    direct_io: false
YAML
  (cd $d && PYTHONPATH=${SRC[$t]} exec $PY -m vmd daemon -c vmd.yaml > daemon.out 2>&1) &
  echo $! > $d/pid
done
for t in $T; do d=$W/$t
  for i in $(seq 100); do [ -e $d/mnt/vol0 ] && break; sleep 0.2; done
  losetup -f --show $d/mnt/vol0 > $d/loop
  dd if=/dev/urandom of=$(cat $d/loop) bs=1M count=512 oflag=direct status=none
done
sync
# job name, cold (drop caches first) or warm, fio arguments
JOBS=(
  "rr4k-cold-1 cold --rw=randread --bs=4k --numjobs=1"
  "rr4k-cold-4 cold --rw=randread --bs=4k --numjobs=4"
  "sr1m-cold-1 cold --rw=read --bs=1M --numjobs=1"
  "rr4k-warm-1 warm --rw=randread --bs=4k --numjobs=1"
  "sr1m-warm-1 warm --rw=read --bs=1M --numjobs=1"
  "rw4k-1 warm --rw=randwrite --bs=4k --numjobs=1"
  "sw1m-warm-1 warm --rw=write --bs=1M --numjobs=1"
  "sw1m-cold-1 cold --rw=write --bs=1M --numjobs=1"
)
# ONLY=REGEX: only the jobs whose name matches (e.g. ONLY=sw1m for the writes).
if [ -n "${ONLY:-}" ]; then
  keep=(); for j in "${JOBS[@]}"; do [[ ${j%% *} =~ $ONLY ]] && keep+=("$j"); done
  JOBS=("${keep[@]}")
fi
for r in $(seq $R); do
  for j in "${JOBS[@]}"; do
    set -- $j; name=$1 mode=$2; shift 2
    # Which tree goes first alternates by round: the second of a pair meets
    # the first's writeback (a 4 KiB random write job: 0.84-0.88 either way).
    order=$T; [ $((r % 2)) = 0 ] && order=$(echo $T | awk '{print $2, $1}')
    for t in $order; do
      d=$W/$t; L=$(cat $d/loop); P=$(cat $d/pid)
      if [ $mode = cold ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
      # Warm: all of the volume in its page cache (loop reads it buffered).
      if [ $mode = warm ] && [ ! -e $d/warm ]; then
        dd if=$L of=/dev/null bs=1M iflag=direct status=none; touch $d/warm; fi
      [ $mode = cold ] && rm -f $W/*/warm
      c0=$(awk '{print $14+$15}' /proc/$P/stat)
      out=$(fio --name=x --filename=$L --direct=1 --ioengine=psync --size=512M --runtime=3 \
            --time_based=1 --group_reporting "$@" --output-format=terse --terse-version=3)
      c1=$(awk '{print $14+$15}' /proc/$P/stat)
      case "$*" in *--bs=1M*) kb=1024;; *) kb=4;; esac
      echo "$out" | awk -F';' -v n=$name -v t=$t -v c=$((c1-c0)) -v kb=$kb -v la=$(cut -d' ' -f1 /proc/loadavg) '
        {           ios = ($6 + $47) / kb; printf "%s %s iops %.0f cpu_us %.0f load %s\n", n, t, $8 + $49, (ios ? c * 10000 / ios : 0), la }'
    done
  done
done
