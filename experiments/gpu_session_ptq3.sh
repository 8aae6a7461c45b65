#!/usr/bin/env bash
# H100 session (PTQ issue, third pass): the rows that decide the default preset at n = 1,000 —
# digits16 W4A8/W8A8 under ptq+gptq and ptq+smooth+gptq (SmoothQuant at 8 bits, GPTQ at 4-6 weight bits),
# patches32 W8A8/W4A8 under ptq+smooth then ptq+smooth+gptq, each model under a time cap (T1, T2).
# Run from the repo root with $OUT set.
TAG=3 T1=${T1:-190} T2=${T2:-250} D_CONFIGS=ptq+gptq,ptq+smooth+gptq D_BITS=4/8,8/8 \
  P_CONFIGS=ptq+smooth,ptq+smooth+gptq P_BITS=8/8,4/8 exec bash "$(dirname "$0")/gpu_session_ptq2.sh"
