// NVFP4 GEMMs with packed weights (nvfp4_gemm.cpp), bound in nvfp4_cpu.cpp's module.
#pragma once
#include <torch/extension.h>

// x fp32 [M, K] times the packed weight -> fp32 [M, N].
torch::Tensor nvfp4_gemm_w4a16_cpu(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                                   torch::Tensor g_rows, int64_t N, torch::Tensor table);
// x as NVFP4 codes uint8 [M, K/2] and scale bytes uint8 [M, K/16] -> fp32 [M, N].
torch::Tensor nvfp4_gemm_w4a4_cpu(torch::Tensor xcodes, torch::Tensor xscales,
                                  torch::Tensor codes, torch::Tensor scales,
                                  torch::Tensor alpha_rows, int64_t N, torch::Tensor table);
