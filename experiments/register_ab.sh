#!/bin/bash
# A/B of the register path: $1 = tree (its workflow/ on PYTHONPATH), $2 = label, rest = register options
tree=$1; label=$2; shift 2
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
for i in 1 2 3 4 5 6; do
  PYTHONPATH=$tree/workflow .venv/bin/python -c "from ldreg.cli import register_main; import sys; sys.exit(register_main(sys.argv[1:]))" \
    --model results/models/student_aldk_long.pt --moving resources/real_anatomy/moved1_image.nii.gz \
    --fixed resources/real_anatomy/fixed_image.nii.gz --moving-labels resources/real_anatomy/moved1_labels.nii.gz \
    --threads 2 --precision float32 "$@" 2>/dev/null | tr -s ' ' | tr '\n' ' '; echo
done | tail -5 | python3 -c "
import sys, re, statistics
rows = [dict(re.findall(r'(\w+): ([0-9.]+) s', l)) for l in sys.stdin]
keys = rows[0].keys()
print('$label', ' '.join(f'{k}={statistics.median(float(r[k]) for r in rows):.3f}' for k in keys))
"
