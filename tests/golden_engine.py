"""Driver for the golden inference-engine fixtures (golden/README.md §2.2).

Runs our engine exactly the way upstream's evaluator drives one augmentation, either
teacher-forced (memory labels from the fixture: the exact test) or free-running.
"""
import numpy as np
import torch
import torch.nn.functional as F

from configs.default import DefaultEngineConfig
from networks.engines import build_engine
from networks.models import build_vos_model
from tests.conftest import shared_path
from tests.golden_weights import recipe_for_module


def golden(name):
    return np.load(shared_path('reference', 'golden', name))


def build_recipe_model(model_id, seed=0, **cfg_overrides):
    cfg = DefaultEngineConfig('golden', model_id)
    for key, value in cfg_overrides.items():
        setattr(cfg, key, value)
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    model.load_state_dict(recipe_for_module(model, seed), strict=True)
    return cfg, model.eval()


def run_engine(model, cfg, inputs, fixture=None, teacher_forced=True, gap=2):
    """Returns dict with per-frame logits_4x, labels_out, lt tokens, newobj logits."""
    images = torch.from_numpy(inputs['images'])
    ref_label = torch.from_numpy(inputs['ref_label'].astype(np.float32))
    new_label = torch.from_numpy(inputs['newobj_label'].astype(np.float32))
    in_size = tuple(images.shape[-2:])
    out_size = tuple(ref_label.shape)
    engine = build_engine(cfg.MODEL_ENGINE, phase='eval', aot_model=model, gpu_id=0,
                          long_term_mem_gap=gap, short_term_mem_skip=1)
    engine.eval()
    out = {'logits_4x': [], 'labels_out': [], 'lt_mem_tokens': [], 'memory_labels': []}
    with torch.no_grad():
        lab0 = F.interpolate(ref_label[None, None], size=in_size, mode='nearest')
        engine.add_reference_frame(images[0:1], lab0, frame_step=0, obj_nums=[3])
        out['lt_mem_tokens'].append(engine.num_long_term_tokens)
        for t in range(1, images.shape[0]):
            engine.match_propogate_one_frame(images[t:t + 1])
            logits = engine.decode_current_logits(out_size)
            out['logits_4x'].append(engine.aot_engines[0].pred_id_logits.clone())
            if t == 1:
                out['logits_out_f1'] = logits[0, :4].clone()
            label = torch.argmax(torch.softmax(logits, 1), 1, keepdim=True).float()
            if t == 3:
                gt = new_label[None, None]
                keep = (gt == 0).float()
                label = label * keep + gt * (1 - keep)
            out['labels_out'].append(label[0, 0].to(torch.uint8))
            if teacher_forced:
                lab_in = torch.from_numpy(
                    fixture['memory_labels'][t - 1].astype(np.float32))[None, None]
            else:
                lab_in = F.interpolate(label, size=in_size, mode='nearest')
            out['memory_labels'].append(lab_in[0, 0].to(torch.uint8))
            if t == 3:
                n = int(lab_in.max()) if teacher_forced else int(label.max())
                engine.add_reference_frame(images[3:4], lab_in, obj_nums=[n], frame_step=3)
                engine.decode_current_logits(out_size)
                out['newobj_ref_logits_4x'] = engine.aot_engines[0].pred_id_logits.clone()
            engine.update_memory(lab_in)
            out['lt_mem_tokens'].append(engine.num_long_term_tokens)
    out['logits_4x'] = torch.stack(out['logits_4x']).numpy()
    out['labels_out'] = torch.stack(out['labels_out']).numpy()
    out['memory_labels'] = torch.stack(out['memory_labels']).numpy()
    out['newobj_ref_logits_4x'] = out['newobj_ref_logits_4x'].numpy()
    out['logits_out_f1'] = out['logits_out_f1'].numpy()
    return out
