"""Propagation engines: drive a model frame by frame and hold one video's memory.

* :class:`AOTEngine` handles up to ``MODEL_MAX_OBJ_NUM`` (10) objects; it is both the
  training engine (``forward`` runs a whole clip and returns the loss) and the per-frame
  engine that :class:`AOTInferEngine` uses.
* :class:`AOTInferEngine` splits more objects over several sub-engines (10 each) that
  share the image encoding, and merges their outputs by soft aggregation.

The public methods keep upstream's names and arguments (``restart_engine``,
``add_reference_frame``, ``match_propogate_one_frame``, ``decode_current_logits``,
``predict_current_mask``, ``update_memory``, ``update_short_term_memory``) so tools written
for aot-benchmark keep working. The memory itself is an explicit
:class:`~networks.engines.memory.VOSMemory` (``engine.memory``).

The same engine serves AOT and DeAOT: their propagation layers share one interface
(``layer(...) -> tokens, curr entry, ref entry`` and ``layer.fuse_key_value_id``).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.layers.basic import seq_to_2d
from networks.layers.loss import CrossEntropyLoss, SoftJaccordLoss

from .identity import generate_permute_matrix, one_hot_mask
from .memory import VOSMemory
from .postprocess import channel_argmax, resize_logits


def split_frames(embs, batch_size):
    """Per-level encoder outputs of a frame-major clip ``(T*B, ...)`` -> ``T`` per-frame lists.

    ``embs`` is ``[x4, x8, x16, x16_projected]`` with ``T*B`` rows each; each frame's list
    holds the same levels with ``B`` rows (what the engines take as ``img_embs``).
    """
    per_level = [torch.split(x, batch_size, dim=0) for x in embs]
    return [list(level) for level in zip(*per_level)]


def _mask_value(dtype):
    return -1e10 if dtype == torch.float32 or dtype == torch.float64 else -1e4


class AOTEngine(nn.Module):
    """One video, at most ``MODEL_MAX_OBJ_NUM`` objects.

    Args:
        aot_model: an :class:`~networks.models.aot.AOT` or ``DeAOT``.
        long_term_mem_gap: store a frame in long-term memory every ``gap`` frames.
        short_term_mem_skip: short-term memory is the frame ``skip`` steps back.
        long_term_mem_max: optional cap on stored long-term frames (reference frames,
            whose masks were given, are always kept; the oldest other frame goes first).
            ``None``: unbounded (upstream behaviour).
    """

    def __init__(self, aot_model, gpu_id=0, long_term_mem_gap=9999, short_term_mem_skip=1,
                 long_term_mem_max=None):
        super().__init__()
        self.cfg = aot_model.cfg
        self.align_corners = aot_model.cfg.MODEL_ALIGN_CORNERS
        self.AOT = aot_model
        self.max_obj_num = aot_model.max_obj_num
        del gpu_id  # upstream's signature; the device is the model's
        self.long_term_mem_gap = long_term_mem_gap
        self.short_term_mem_skip = short_term_mem_skip
        self.long_term_mem_max = long_term_mem_max
        self.losses = None
        self.restart_engine()

    # -- state ----------------------------------------------------------------------
    def restart_engine(self, batch_size=1, enable_id_shuffle=False, id_shuffle_matrix=None):
        """Start a new batch of videos. ``enable_id_shuffle`` draws a random ID permutation
        per sample; ``id_shuffle_matrix`` ``(B, 1+N, 1+N)`` gives them instead (training draws
        them for the global batch from its seed) and implies shuffling."""
        self.batch_size = batch_size
        self.frame_step = 0
        self.enable_id_shuffle = bool(enable_id_shuffle or id_shuffle_matrix is not None)
        self.freeze_id = False
        self.obj_nums = None
        self.pos_emb = None
        self.enc_size_2d = None
        self.enc_hw = None
        self.input_size_2d = None
        self.memory = VOSMemory(len(self.AOT.LSTT.layers), self.long_term_mem_max,
                                self.long_term_mem_gap, self.short_term_mem_skip)
        self.enable_offline_enc = False
        self.offline_enc_embs = None
        self.offline_masks = None
        self.offline_one_hot_masks = None
        self.total_offline_frame_num = 0
        self.curr_enc_embs = None
        self.curr_lstt_output = None
        self.curr_id_embs = None
        self.pred_id_logits = None
        self.id_shuffle_matrix = id_shuffle_matrix
        if self.enable_id_shuffle and id_shuffle_matrix is None:
            self.id_shuffle_matrix = generate_permute_matrix(
                self.max_obj_num + 1, batch_size, device=self._device())

    @property
    def last_mem_step(self):
        return self.memory.last_long_term_step

    def _device(self):
        return next(self.AOT.parameters()).device

    def update_size(self, input_size, enc_size):
        self.input_size_2d = tuple(input_size)
        self.enc_size_2d = tuple(enc_size)
        self.enc_hw = self.enc_size_2d[0] * self.enc_size_2d[1]

    # -- encoding -------------------------------------------------------------------
    def _to_tokens(self, x2d):
        return x2d.view(self.batch_size, -1, self.enc_hw).permute(2, 0, 1)

    def offline_encoder(self, all_frames, all_masks=None):
        """Encode a whole training clip at once (frames are frame-major: ``T*B``)."""
        self.enable_offline_enc = True
        self.offline_enc_embs = self._split_frames(self.AOT.encode_image(all_frames))
        self.total_offline_frame_num = len(self.offline_enc_embs)
        if all_masks is not None:
            self.offline_masks = list(torch.split(all_masks, self.batch_size, dim=0))
            self.offline_one_hot_masks = list(torch.split(
                one_hot_mask(all_masks, self.max_obj_num), self.batch_size, dim=0))
        if self.input_size_2d is None:
            self.update_size(all_frames.shape[2:], self.offline_enc_embs[0][-1].shape[2:])

    def _split_frames(self, xs):
        return split_frames(xs, self.batch_size)

    def encode_one_img_mask(self, img=None, mask=None, frame_step=-1):
        if frame_step == -1:
            frame_step = self.frame_step
        if self.enable_offline_enc:
            enc = self.offline_enc_embs[frame_step]
        elif img is None:
            enc = None
        else:
            enc = self.AOT.encode_image(img)
        if mask is not None:
            one_hot = one_hot_mask(mask, self.max_obj_num)
        elif self.enable_offline_enc and self.offline_one_hot_masks is not None:
            one_hot = self.offline_one_hot_masks[frame_step]
        else:
            one_hot = None
        return enc, one_hot

    def assign_identity(self, one_hot):
        """One-hot ``(B, 1+N, H, W)`` -> ID embedding tokens ``(L, B, d)``."""
        if self.enable_id_shuffle:
            one_hot = torch.einsum('bohw,bot->bthw', one_hot, self.id_shuffle_matrix)
        id_emb = self._to_tokens(self.AOT.get_id_emb(one_hot))
        if self.training and self.freeze_id:
            id_emb = id_emb.detach()
        return id_emb

    # -- per-frame steps --------------------------------------------------------------
    def add_reference_frame(self, img=None, mask=None, frame_step=-1, obj_nums=None,
                            img_embs=None):
        """Condition on a frame with a known mask (the first frame, or a frame where new
        objects appear). Its memory entry is stored in long-term memory whatever the gap
        and replaces short-term memory."""
        if obj_nums is not None:
            self.obj_nums = list(obj_nums)
        if self.obj_nums is None:
            raise ValueError('add_reference_frame needs obj_nums for the first reference')
        if frame_step == -1:
            frame_step = self.frame_step
        if img_embs is None:
            enc, one_hot = self.encode_one_img_mask(img, mask, frame_step)
        else:
            _, one_hot = self.encode_one_img_mask(None, mask, frame_step)
            enc = img_embs
        if enc is None:
            raise ValueError('add_reference_frame needs an image (or image embeddings)')
        if one_hot is None:
            raise ValueError('add_reference_frame needs a mask')
        if self.input_size_2d is None:
            self.update_size(img.shape[2:] if img is not None else one_hot.shape[2:],
                             enc[-1].shape[2:])
        self.curr_enc_embs = enc
        if self.pos_emb is None:
            self.pos_emb = self._to_tokens(
                self.AOT.get_pos_emb(enc[-1]).expand(self.batch_size, -1, -1, -1))
        self._reference_pass(one_hot, self.frame_step)

    def _reference_pass(self, one_hot, step):
        """Propagate the current frame against itself under its known IDs and store the
        result: prepended to long-term memory (whatever the gap) and as short-term memory."""
        id_emb = self.assign_identity(one_hot)
        self.curr_id_embs = id_emb
        empty = [None] * self.memory.num_layers
        outputs, currs, refs = self.AOT.LSTT_forward(
            self.curr_enc_embs, empty, empty, id_emb, pos_emb=self.pos_emb,
            size_2d=self.enc_size_2d)
        self.curr_lstt_output = (outputs, currs, refs)
        self.memory.write_reference(refs, [r.map(self._seq_to_2d) for r in refs], step)

    def _seq_to_2d(self, t):
        return seq_to_2d(t, self.enc_size_2d)

    def match_propogate_one_frame(self, img=None, img_embs=None):
        """Encode the next frame (unless ``img_embs`` is given) and propagate memory to it."""
        self.frame_step += 1
        if img_embs is None:
            enc, _ = self.encode_one_img_mask(img, None, self.frame_step)
        else:
            enc = img_embs
        self.curr_enc_embs = enc
        layers = range(self.memory.num_layers)
        self.curr_lstt_output = self.AOT.LSTT_forward(
            enc, [self.memory.layer_long_term(i) for i in layers], self.memory.short_term,
            None, pos_emb=self.pos_emb, size_2d=self.enc_size_2d)

    def decode_current_logits(self, output_size=None, live_only=False):
        """Decode the current frame: ``(B, 1+N, H/4, W/4)`` logits (or at ``output_size``),
        with IDs un-shuffled and unused ID channels set to -1e10 (``N = MODEL_MAX_OBJ_NUM``).

        ``live_only``: return only the ``1 + max(obj_nums)`` channels in use (see
        :func:`resize_logits`); ``pred_id_logits`` keeps all channels either way.
        """
        logits = self.AOT.decode_id_logits(self.curr_lstt_output[0], self.curr_enc_embs)
        if self.enable_id_shuffle:
            logits = torch.einsum('bohw,bto->bthw', logits, self.id_shuffle_matrix)
        # Mask channels above each sample's object count without data-dependent loops.
        ids = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1, 1)
        counts = torch.as_tensor(self.obj_nums, device=logits.device).view(-1, 1, 1, 1)
        logits = logits.masked_fill(ids > counts, _mask_value(logits.dtype))
        self.pred_id_logits = logits
        return resize_logits(logits, output_size, self.obj_nums, self.align_corners, live_only)

    def predict_current_mask(self, output_size=None, return_prob=False):
        if output_size is None:
            output_size = self.input_size_2d
        logits = F.interpolate(self.pred_id_logits, size=output_size, mode='bilinear',
                               align_corners=self.align_corners)
        mask = channel_argmax(logits)
        if not return_prob:
            return mask
        return mask, torch.softmax(logits, dim=1)

    def update_short_term_memory(self, curr_mask, curr_id_emb=None,
                                 skip_long_term_update=False):
        """Write the current frame into memory given its mask.

        ``curr_mask`` is a label map (``(B, H, W)`` or ``(B, 1, H, W)``) or, with more
        than one channel, per-ID probabilities. Only the ID values are computed here; K
        and V are the ones the frame produced as a query.
        """
        if curr_id_emb is None:
            if curr_mask.dim() == 3 or curr_mask.shape[1] == 1:
                one_hot = one_hot_mask(curr_mask, self.max_obj_num)
            else:
                one_hot = curr_mask
            curr_id_emb = self.assign_identity(one_hot)
        layers = self.AOT.LSTT.layers
        entries = [layer.fuse_key_value_id(curr, curr_id_emb)
                   for layer, curr in zip(layers, self.curr_lstt_output[1])]
        self.memory.write(entries, [e.map(self._seq_to_2d) for e in entries], self.frame_step,
                          long_term=not skip_long_term_update)

    # -- training ---------------------------------------------------------------------
    def _init_losses(self):
        cfg = self.cfg
        self.losses = nn.ModuleList([
            CrossEntropyLoss(cfg.TRAIN_TOP_K_PERCENT_PIXELS,
                             cfg.TRAIN_HARD_MINING_RATIO * cfg.TRAIN_TOTAL_STEPS),
            SoftJaccordLoss()])
        self.loss_weights = [0.5, 0.5]
        self.aux_weight = cfg.TRAIN_AUX_LOSS_WEIGHT
        self.aux_step = cfg.TRAIN_TOTAL_STEPS * cfg.TRAIN_AUX_LOSS_RATIO + 1e-5

    def calculate_current_loss(self, gt_mask, step):
        """Per-sample loss ``(B,)`` of the current logits against ``gt_mask``."""
        logits = F.interpolate(self.pred_id_logits, size=gt_mask.shape[-2:], mode='bilinear',
                               align_corners=self.align_corners)
        per_sample = []
        for b, n in enumerate(self.obj_nums):
            logit = logits[b:b + 1, :n + 1]
            label = gt_mask[b:b + 1].long()
            total = 0
            for loss, weight in zip(self.losses, self.loss_weights):
                total = total + weight * loss(logit, label, step)
            per_sample.append(total.reshape(1))
        return torch.cat(per_sample)

    def generate_loss_mask(self, gt_mask, step, return_prob=False):
        self.decode_current_logits()
        loss = self.calculate_current_loss(gt_mask, step)
        if return_prob:
            mask, prob = self.predict_current_mask(return_prob=True)
            return loss, mask, prob
        return loss, self.predict_current_mask()

    def forward(self, all_frames, all_masks, batch_size, obj_nums, step=0, tf_board=False,
                use_prev_pred=False, enable_prev_frame=False, use_prev_prob=False):
        """Training pass over a clip (upstream's ``AOTEngine.forward``).

        Args:
            all_frames: ``(T*B, 3, H, W)`` frame-major (reference, previous, current...).
            all_masks: ``(T*B, 1, H, W)`` labels.
            use_prev_pred: sequential phase: memory IDs come from the predicted (detached)
                masks instead of the ground truth.
            tf_board: upstream's switch for image logs; accepted and ignored.
        Returns:
            ``(loss, all_pred_mask, all_frame_loss, boards)``: scalar loss, per-frame
            argmax masks ``(B, H, W)``, per-frame losses ``(B,)`` and upstream's board slot,
            always empty (kept so upstream's 4-tuple unpacking works).
        """
        if self.losses is None:
            self._init_losses()
        self.freeze_id = bool(use_prev_pred)
        aux_weight = self.aux_weight * max(self.aux_step - step, 0.0) / self.aux_step

        self.offline_encoder(all_frames, all_masks)
        self.add_reference_frame(frame_step=0, obj_nums=obj_nums)
        grad_state = torch.no_grad if aux_weight == 0 else torch.enable_grad
        with grad_state():
            ref_loss, ref_mask = self.generate_loss_mask(self.offline_masks[0], step)
        aux_losses, aux_masks = [ref_loss], [ref_mask]
        curr_losses, curr_masks = [], []

        def memory_ids(mask, prob):
            source = prob if use_prev_prob else mask
            if use_prev_pred:
                return source, None
            return source, self.assign_identity(self.offline_one_hot_masks[self.frame_step])

        if enable_prev_frame:
            self.set_prev_frame(frame_step=1)
            with grad_state():
                prev_loss, prev_mask = self.generate_loss_mask(self.offline_masks[1], step)
            aux_losses.append(prev_loss)
            aux_masks.append(prev_mask)
        else:
            self.match_propogate_one_frame()
            loss, mask, prob = self.generate_loss_mask(
                self.offline_masks[self.frame_step], step, return_prob=True)
            self.update_short_term_memory(*memory_ids(mask, prob))
            curr_losses.append(loss)
            curr_masks.append(mask)

        self.match_propogate_one_frame()
        loss, mask, prob = self.generate_loss_mask(
            self.offline_masks[self.frame_step], step, return_prob=True)
        curr_losses.append(loss)
        curr_masks.append(mask)
        for _ in range(self.total_offline_frame_num - 3):
            self.update_short_term_memory(*memory_ids(mask, prob))
            self.match_propogate_one_frame()
            loss, mask, prob = self.generate_loss_mask(
                self.offline_masks[self.frame_step], step, return_prob=True)
            curr_losses.append(loss)
            curr_masks.append(mask)

        aux_loss = torch.cat(aux_losses).mean()
        pred_loss = torch.cat(curr_losses).mean()
        total = aux_weight * aux_loss + pred_loss
        del tf_board
        return total, aux_masks + curr_masks, aux_losses + curr_losses, {'image': {}, 'scalar': {}}

    def set_prev_frame(self, frame_step=1):
        """Use frame ``frame_step`` as a second ground-truth reference (upstream's
        ``enable_prev_frame`` training mode)."""
        self.frame_step = frame_step
        enc, one_hot = self.encode_one_img_mask(None, None, frame_step)
        self.curr_enc_embs = enc
        self._reference_pass(one_hot, frame_step)


class AOTInferEngine(nn.Module):
    """Inference over any number of objects: ``ceil(N / 10)`` sub-engines share the image
    encoding; their outputs are merged by soft aggregation.

    Args:
        long_term_mem_max: optional cap on stored long-term frames per sub-engine.
    """

    engine_class = AOTEngine

    def __init__(self, aot_model, gpu_id=0, long_term_mem_gap=9999, short_term_mem_skip=1,
                 max_aot_obj_num=None, long_term_mem_max=None):
        super().__init__()
        self.cfg = aot_model.cfg
        self.AOT = aot_model
        if max_aot_obj_num is None or max_aot_obj_num > aot_model.max_obj_num:
            max_aot_obj_num = aot_model.max_obj_num
        self.max_aot_obj_num = max_aot_obj_num
        del gpu_id  # upstream's signature; the device is the model's
        self.long_term_mem_gap = long_term_mem_gap
        self.short_term_mem_skip = short_term_mem_skip
        self.long_term_mem_max = long_term_mem_max
        self.aot_engines = []
        self.restart_engine()

    def restart_engine(self):
        self.aot_engines = []
        self.obj_nums = None
        self.input_size_2d = None

    def separate_mask(self, mask, obj_nums):
        """Split a label map (or per-object probabilities) over the sub-engines."""
        n_eng = len(self.aot_engines)
        if mask is None:
            return [None] * n_eng, [None] * n_eng
        per = self.max_aot_obj_num
        counts = [per] * n_eng
        if obj_nums % per > 0:
            counts[-1] = obj_nums % per
        if n_eng == 1:
            return [mask], [obj_nums]
        if mask.dim() == 3 or mask.shape[1] == 1:
            parts = []
            for idx in range(n_eng):
                start, end = idx * per + 1, (idx + 1) * per
                fg = ((mask >= start) & (mask <= end)).to(mask.dtype)
                parts.append((mask - start + 1) * fg)
            return parts, counts
        # Probabilities (B, 1+N, H, W): background plus each engine's channel slice.
        # (Upstream sliced the batch axis here; we slice channels.)
        parts = [torch.cat([mask[:, :1], mask[:, 1 + idx * per:1 + (idx + 1) * per]], dim=1)
                 for idx in range(n_eng)]
        return parts, counts

    def soft_logit_aggregation(self, all_logits):
        if len(all_logits) == 1:
            return all_logits[0]
        fg, bg = [], []
        for logit in all_logits:
            prob = torch.softmax(logit, dim=1)
            bg.append(prob[:, 0:1])
            fg.append(prob[:, 1:1 + self.max_aot_obj_num])
        bg_prob = torch.prod(torch.cat(bg, dim=1), dim=1, keepdim=True)
        merged = torch.cat([bg_prob] + fg, dim=1).clamp(1e-5, 1 - 1e-5)
        return torch.logit(merged)

    def new_sub_engine(self):
        """One more sub-engine (for objects ``10k+1 .. 10k+10``) with this engine's memory
        policy."""
        engine = self.engine_class(self.AOT, long_term_mem_gap=self.long_term_mem_gap,
                                   short_term_mem_skip=self.short_term_mem_skip,
                                   long_term_mem_max=self.long_term_mem_max)
        return engine.eval()

    def add_reference_frame(self, img, mask, obj_nums, frame_step=-1):
        if isinstance(obj_nums, (list, tuple)):
            obj_nums = obj_nums[0]
        obj_nums = int(obj_nums)
        self.obj_nums = obj_nums
        needed = max(math.ceil(obj_nums / self.max_aot_obj_num), 1)
        while len(self.aot_engines) < needed:
            engine = self.new_sub_engine()
            if self.aot_engines and frame_step > 0:
                # A sub-engine created mid-video counts its memory gap from this frame
                # (upstream restarted it at 0).
                engine.frame_step = frame_step
            self.aot_engines.append(engine)
        masks, counts = self.separate_mask(mask, obj_nums)
        img_embs = None
        for engine, part, count in zip(self.aot_engines, masks, counts):
            engine.add_reference_frame(img, part, obj_nums=[count], frame_step=frame_step,
                                       img_embs=img_embs)
            if img_embs is None:
                img_embs = engine.curr_enc_embs
        self.input_size_2d = self.aot_engines[0].input_size_2d

    def match_propogate_one_frame(self, img=None):
        img_embs = None
        for engine in self.aot_engines:
            engine.match_propogate_one_frame(img, img_embs=img_embs)
            if img_embs is None:
                img_embs = engine.curr_enc_embs

    def decode_current_logits(self, output_size=None, live_only=False):
        """Merged logits of the sub-engines: ``(1, 1 + 10 * n_engines, ...)``.

        ``live_only`` (see :func:`~networks.engines.postprocess.resize_logits`) applies to a
        single sub-engine (up to 10 objects): ``(1, 1 + obj_nums, ...)``. With several, every
        channel is kept: the soft aggregation clamps probabilities to ``[1e-5, 1 - 1e-5]``, so
        unused channels carry a little probability mass, and upstream's probabilities
        include it.
        """
        if len(self.aot_engines) == 1:
            return self.aot_engines[0].decode_current_logits(output_size, live_only=live_only)
        return self.soft_logit_aggregation(
            [engine.decode_current_logits(output_size) for engine in self.aot_engines])

    def update_memory(self, curr_mask, skip_long_term_update=False):
        masks, _ = self.separate_mask(curr_mask, self.obj_nums)
        for engine, part in zip(self.aot_engines, masks):
            engine.update_short_term_memory(part, skip_long_term_update=skip_long_term_update)

    @property
    def num_long_term_tokens(self):
        return self.aot_engines[0].memory.num_long_term_tokens() if self.aot_engines else 0
