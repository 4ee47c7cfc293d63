#!/usr/bin/env bash
# The cross-validated real-data study of README "Every labelled case tested, and self-training": BraTS FLAIR+T1
# from ../shared/data, all 10 labelled cases as the pool, --cv 2, seeds 0 1 2, 2d at 2 mm, 25 x 10 iterations.
#
#   benchmarks/study_brats_cv.sh WORKDIR [STAGE ...]
#
# WORKDIR holds the converted and planned dataset (work/) and the study folder (study/); everything is resumable:
# a stage re-run skips the runs already done. Stages, in the order they were run (default: all):
#   prep      convert + plan + preprocess (real_data_run.py --prepare-only)
#   n1core    1 labelled: nnUNetTrainer, its self-training (+st), Mean Teacher and MemCif at the paper weights
#   n1share   1 labelled: Mean Teacher and MemCif with unsupervised_share_target 0.2
#   n1mmf     1 labelled: MMF-MCML
#   n1share05 1 labelled: Mean Teacher and MemCif with unsupervised_share_target 0.05
#   n1ft      1 labelled: MMF-MCML and Mean Teacher fine-tuned from nnUNetTrainer's model of the run
#   n3core    3 labelled: as n1core
#   n1twin    1 labelled: MemCifSupervisedTrainer (MemCif's network without the unlabelled term), paired with
#             nnUNetTrainer, to tell MemCif's network from its unlabelled term
#   report    the report over every arm finished (--report-only; safe while runs go on)
#   archive   copy the finished runs' result files, the settings, the report and WORKDIR/study/earlier/* into
#             benchmarks/results/brats_cv_study (small; the models stay in WORKDIR). To report from an archive on
#             another machine: run `prep`, copy the archive's runs/ and study_settings.json into WORKDIR/study, then
#             `report` (a run's result file is its record; resuming retrains the archived runs, their models are gone)
# Every SSL arm is paired with nnUNetTrainer (--pair), which is also the teacher of the self-training arm.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mkdir -p "$1" && cd "$1" && pwd)"; shift
stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(prep n1core n1share n1mmf n1share05 n1ft n3core report)
data="${MMSSL_SHARED_DATA:-$here/../shared/data}"
export nnUNet_raw="$work/work/nnUNet_raw" nnUNet_preprocessed="$work/work/nnUNet_preprocessed"
export nnUNet_results="$work/work/nnUNet_results" nnUNet_n_proc_DA=0 nnUNet_def_n_proc=2

SSL=(MeanTeacherTrainer MeanTeacherTrainer_share0p2 MeanTeacherTrainer_share0p05 MemCifSSLTrainer
     MemCifSSLTrainer_share0p2 MemCifSSLTrainer_share0p05 MMFMCMLTrainer)
study() {  # study "LABELLED..." -tr TRAINERS... [study options...]; every SSL trainer of -tr paired with nnUNetTrainer
    local n="$1"; shift
    local pairs=() t
    for t in "${SSL[@]}"; do [[ " $* " == *" $t "* ]] && pairs+=(--pair "$t=nnUNetTrainer"); done
    # shellcheck disable=SC2086
    nnUNetv2_mmssl_study -d 501 -p nnUNetPlans_bs4 -c 2d --cv 2 --labeled $n --seeds 0 1 2 --epochs 25 \
        --iterations 10 --val-iterations 2 --workers 2 -o "$work/study" "${pairs[@]}" "$@"
}

for stage in "${stages[@]}"; do
    echo "=== $stage $(date -u +%FT%TZ)"
    case "$stage" in
        prep) python "$here/benchmarks/real_data_run.py" --data "$data" --workdir "$work/work" -c 2d \
                  --spacing 2 2 2 --batch-size 4 --num-labeled 10 --num-test 0 --prepare-only ;;
        n1core) study 1 -tr nnUNetTrainer MeanTeacherTrainer MemCifSSLTrainer --selftrain nnUNetTrainer ;;
        n1share) study 1 -tr nnUNetTrainer MeanTeacherTrainer_share0p2 MemCifSSLTrainer_share0p2 ;;
        n1mmf) study 1 -tr nnUNetTrainer MMFMCMLTrainer ;;
        n1share05) study 1 -tr nnUNetTrainer MeanTeacherTrainer_share0p05 MemCifSSLTrainer_share0p05 ;;
        # --init supervised alone: the from-scratch runs of these trainers are n1core's and n1mmf's (with scratch
        # here too, a run whose model folder is gone -- an archived study -- would be trained again, replacing them)
        n1ft) study 1 -tr nnUNetTrainer MMFMCMLTrainer MeanTeacherTrainer --init supervised \
                  --finetune MMFMCMLTrainer MeanTeacherTrainer ;;
        n1twin) study 1 -tr nnUNetTrainer MemCifSupervisedTrainer --pair MemCifSupervisedTrainer=nnUNetTrainer ;;
        n3core) study 3 -tr nnUNetTrainer MeanTeacherTrainer MemCifSSLTrainer --selftrain nnUNetTrainer ;;
        report) study "1 3" -tr nnUNetTrainer "${SSL[@]}" MemCifSupervisedTrainer \
                    --pair MemCifSupervisedTrainer=nnUNetTrainer --selftrain nnUNetTrainer --init scratch supervised \
                    --finetune MMFMCMLTrainer MeanTeacherTrainer --report-only ;;
        archive) dest="$here/benchmarks/results/brats_cv_study"; rm -rf "$dest.tmp"; mkdir -p "$dest.tmp"
                 cp -r "$work/study/runs" "$work/study/study_settings.json" "$dest.tmp/"
                 # earlier/: superseded runs' result files kept as a record (first_runs: nnUNetTrainer's first set;
                 # old_log_rule: the share-target arms under the old log-average controller), copied as they are
                 [ -d "$work/study/earlier" ] && cp -r "$work/study/earlier/." "$dest.tmp/"
                 for f in study_table.txt study_results.json dice_vs_labeled.png; do
                     [ -f "$work/study/$f" ] && cp "$work/study/$f" "$dest.tmp/"; done
                 rm -rf "$dest"; mv "$dest.tmp" "$dest"; echo "archived to $dest" ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
