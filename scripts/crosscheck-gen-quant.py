#!/usr/bin/env python3
"""Cross-checks `keel gen-model --quant` against the reference libraries' own code (optional:
needs torch, safetensors, transformers, compressed-tensors and nvidia-modelopt, the last
installable with `pip install --no-deps nvidia-modelopt`; not part of the test suite).

usage: scripts/crosscheck-gen-quant.py DIR
  DIR holds PRESET-none, PRESET-nvfp4, PRESET-nvfp4-ct, PRESET-fp8 and PRESET-mxfp4 written by
  `keel gen-model --preset PRESET --seed S --quant Q --out DIR/PRESET-Q` (same seed), for the
  presets listed at the bottom.

Checks: nvfp4 = ModelOpt's NVFP4QTensor.quantize on the bf16 weights, bit for bit (its module
is executed from source with its three small tensor helpers written here, so that ModelOpt's
import chain need not be installed); nvfp4-ct = compressed-tensors' generate_gparam,
calculate_qparams, quantize and pack_fp4_to_uint8, bit for bit (fused gate/up share the
smaller global scale as llm-compressor does); mxfp4 = transformers' convert_moe_packed_tensors
decodes to within one E2M1 step of the bf16 weights (gate rows then up rows); fp8 = torch reads
F8_E4M3 and block * weight_scale_inv is within E4M3 rounding of the bf16 weights.
"""
import json, sys, types, math, re
import torch
from safetensors.torch import load_file

root = sys.argv[1]
import importlib.util, os
# modelopt's directory, without importing the package (its import chain is heavy)
SITE = os.path.dirname(importlib.util.find_spec('modelopt').submodule_search_locations[0]) + '/'

# --- ModelOpt NVFP4QTensor, executed from its source with its three helpers stubbed ---
src = open(SITE + 'modelopt/torch/quantization/qtensor/nvfp4_tensor.py').read()
src = re.sub(r'^from \.\.backends\.utils import fp4_compatible', 'fp4_compatible = lambda: False', src, flags=re.M)
src = re.sub(r'^from \.\.qtensor\.base_qtensor import BaseQuantizedTensor', '''
class BaseQuantizedTensor:
    def __init__(self, shape, dtype, data):
        self._quantized_data = data''', src, flags=re.M)
src = re.sub(r'^from \.\.utils\.numeric_utils import .*$', 'E2M1_MAX = 6.0\nE4M3_MAX = 448.0\nfp8_max_for_normalization = 448.0', src, flags=re.M)
src = re.sub(r'^from \.\.utils import .*$', '''
def reduce_amax(x, axis=None, keepdims=False):
    return x.abs().amax()
def reduce_block_amax(x, block_sizes):
    b = block_sizes[-1]
    return x.reshape(*x.shape[:-1], -1, b).abs().amax(-1)
def reduce_block_padding(x, block_sizes):
    assert x.shape[-1] % block_sizes[-1] == 0
    return x''', src, flags=re.M)
mo = {'__name__': 'nvfp4_tensor'}
exec(compile(src, 'nvfp4_tensor.py', 'exec'), mo)
NVFP4QTensor = mo['NVFP4QTensor']

from compressed_tensors.quantization.utils.helpers import generate_gparam, calculate_qparams
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

def ref_matrix(ref, module):
    if module + '.weight' in ref:
        return ref[module + '.weight']
    pre, rest = module.split('.experts.')
    e, proj = rest.split('.', 1)
    e = int(e)
    if proj == 'down_proj':
        return ref[pre + '.experts.down_proj'][e]
    gu = ref[pre + '.experts.gate_up_proj'][e]
    i = gu.shape[0] // 2
    return gu[:i] if proj == 'gate_proj' else gu[i:]

def partner(module):
    for a, b in (('gate_proj', 'up_proj'), ('up_proj', 'gate_proj'), ('w1', 'w3'), ('w3', 'w1')):
        if module.endswith('.' + a):
            return module[: -len(a)] + b
    return None

def check_modelopt(d, ref):
    q = load_file(d + '/model.safetensors')
    n = 0
    for name in q:
        if not name.endswith('.weight_scale_2'):
            continue
        m = name[: -len('.weight_scale_2')]
        w = ref_matrix(ref, m)
        p = partner(m)
        amax = w.float().abs().amax()
        if p:
            amax = torch.maximum(amax, ref_matrix(ref, p).float().abs().amax())
        ws2 = amax.float() / (6.0 * 448.0)  # shared, as the export's fused amax
        qt, scale, ws2_out = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=ws2)
        assert torch.equal(qt._quantized_data, q[m + '.weight']), m
        assert torch.equal(scale.view(torch.uint8), q[m + '.weight_scale'].view(torch.uint8)), m
        assert q[m + '.weight_scale_2'].shape == torch.Size([]) and q[m + '.weight_scale_2'].item() == ws2.item(), m
        n += 1
    return n

def check_ct(d, ref):
    q = load_file(d + '/model.safetensors')
    args = QuantizationArgs(num_bits=4, type='float', strategy='tensor_group', group_size=16, symmetric=True, scale_dtype=torch.float8_e4m3fn)
    n = 0
    for name in q:
        if not name.endswith('.weight_global_scale'):
            continue
        m = name[: -len('.weight_global_scale')]
        w = ref_matrix(ref, m)
        p = partner(m)
        mats = [w] + ([ref_matrix(ref, p)] if p else [])
        # llm-compressor: each shard's gparam, then the fused layers share the min
        gs = min(generate_gparam(x.float().amin(), x.float().amax()) for x in mats)
        wb = w.float().reshape(w.shape[0], -1, 16)
        scale, zp = calculate_qparams(wb.amin(-1), wb.amax(-1), args, global_scale=gs)
        xq = ct_quantize(w.float(), scale, zp, args, global_scale=gs)
        packed = pack_fp4_to_uint8(xq)
        assert torch.equal(gs, q[m + '.weight_global_scale']), (m, gs, q[m + '.weight_global_scale'])
        assert torch.equal(scale.to(torch.float8_e4m3fn).view(torch.uint8), q[m + '.weight_scale'].view(torch.uint8)), m
        assert torch.equal(packed, q[m + '.weight_packed']), m
        n += 1
    return n

def check_mxfp4(d, ref):
    q = load_file(d + '/model.safetensors')
    n = 0
    for name in q:
        if not name.endswith('_blocks'):
            continue
        base = name[: -len('_blocks')]
        deq = convert_moe_packed_tensors(q[name], q[base + '_scales'], dtype=torch.float32).transpose(1, 2)
        pre = base.split('.experts.')[0] + '.experts.'
        E = deq.shape[0]
        for e in range(E):
            if base.endswith('gate_up_proj'):
                names = ['gate_proj', 'up_proj'] if pre + f'{e}.gate_proj.weight' in ref or pre + 'gate_up_proj' in ref else ['w1', 'w3']
                want = torch.cat([ref_matrix(ref, pre + f'{e}.' + x).float() for x in names])
            else:
                dn = 'down_proj' if (pre + f'{e}.down_proj.weight' in ref or pre + 'down_proj' in ref) else 'w2'
                want = ref_matrix(ref, pre + f'{e}.' + dn).float()
            err = (deq[e] - want).abs()
            # per-32 block: error <= 2^e (one E2M1 step at the top of the range, saturation)
            s = torch.ldexp(torch.ones(q[base + '_scales'][e].shape), q[base + '_scales'][e].to(torch.int32) - 127)
            bound = s.repeat_interleave(32, -1) * 2.0
            assert bool((err <= bound).all()), base
        n += 1
    return n

def check_fp8(d, ref):
    q = load_file(d + '/model.safetensors')
    n = 0
    for name in q:
        if not name.endswith('.weight_scale_inv'):
            continue
        m = name[: -len('.weight_scale_inv')]
        w = ref_matrix(ref, m).float()
        s = q[name].float().repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        deq = q[m + '.weight'].float() * s
        assert q[m + '.weight'].dtype == torch.float8_e4m3fn
        assert bool(((deq - w).abs() <= w.abs() / 16 + s / 512).all()), m
        n += 1
    return n

for preset in ['tiny', 'tiny-qwen2', 'tiny-mixtral', 'tiny-qwen3.5', 'tiny-qwen3-next', 'small-qwen3.5']:
    ref = load_file(f'{root}/{preset}-none/model.safetensors')
    out = [preset]
    out.append('modelopt %d' % check_modelopt(f'{root}/{preset}-nvfp4', ref))
    out.append('ct %d' % check_ct(f'{root}/{preset}-nvfp4-ct', ref))
    out.append('fp8 %d' % check_fp8(f'{root}/{preset}-fp8', ref))
    if preset != 'tiny':
        out.append('mxfp4 %d' % check_mxfp4(f'{root}/{preset}-mxfp4', ref))
    print(*out)
