#!/usr/bin/env bash
# The pipeline step by step on the built-in synthetic cohort, one command per step,
# each writing plain files the next one reads. CPU, about 10 minutes on 2 cores.
# Replace `work/cohort` by your own BraTS / MSD / BIDS folder to run it on real data
# (and `--config cpu-demo` by `brats-128` on a GPU).
set -euo pipefail
W=${1:-work}

# 1. A cohort of 30 subjects in the BraTS 2023 layout, with ground-truth healthy twins.
diffca-med phantom "$W/cohort" -n 30 --grid half --layout brats2023

# 2. The slice store: validated, normalised 64x64 axial slices, split by subject.
diffca-med prepare "$W/cohort" "$W/store" --size 64

# 3. Train stage 1 (diffusion autoencoder) and stage 2 (common/salient split).
diffca-med train "$W/store" --config cpu-demo --out "$W/run"

# 4. Pseudo-healthy volumes, anomaly maps and previews of the test subjects.
test_subjects=$(python -c "import pandas as p; t=p.read_csv('$W/store/subjects.csv'); print(','.join(t[t.split=='test'].subject))")
diffca-med pseudo-healthy "$W/run/model" "$W/store" "$W/pseudo-healthy" --subjects "$test_subjects"

# 5. Salient embeddings of every slice, subgroups joined with the clinical table.
diffca-med embed "$W/run/model" "$W/store" "$W/embeddings"
diffca-med subgroups "$W/embeddings/subject_embeddings.csv" "$W/subgroups" --clinical "$W/cohort/participants.tsv"

# 6. One HTML page per subject and an index.
diffca-med report "$W/pseudo-healthy" "$W/report" --subgroups "$W/subgroups"

# 7. Scores against the phantom's true healthy twins.
diffca-med evaluate "$W/run/model" "$W/store" "$W/evaluation" --ground-truth "$W/cohort/derivatives/phantom-truth"
echo "open $W/report/index.html"
