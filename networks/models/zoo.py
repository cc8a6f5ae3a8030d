"""Where a model id's trained weights are found when no checkpoint is named.

``pretrain_models/`` holds two kinds of files:

- the weights this project trains and ships (:data:`SHIPPED_WEIGHTS`, with sha256 and model
  cards in ``pretrain_models/README.md``): the label-free distilled GDA student and the
  supervised teacher it was distilled from;
- upstream's released checkpoints, which users copy there under their release names
  ``<MODEL_NAME>_<STAGE>.pth`` (e.g. ``DeAOTT_PRE_YTB_DAV.pth``); the best stage wins.

:func:`find_checkpoint` returns the first that exists: a released file (trained on far more
data than ours), then the shipped one.
"""
import os

from configs.default import load_model_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN_DIR = os.path.join(REPO_ROOT, 'pretrain_models')

# model id -> file in pretrain_models/ trained by this project (docs/results.md).
SHIPPED_WEIGHTS = {
    'deaott_gda': 'deaott_gda_kd.pth',
    'deaotl': 'deaotl_teacher.pth',
}
# Released checkpoints are named <MODEL_NAME>_<STAGE>.pth; the best stage first.
RELEASE_STAGES = ('PRE_YTB_DAV', 'PRE_YTB', 'PRE_DAV', 'YTB', 'PRE')
# The model the demo and the API use when none is named: the shipped student.
DEFAULT_MODEL = 'deaott_gda'


def find_checkpoint(model_id, model_name=None, folder=None):
    """Path of the weights for ``model_id`` in ``folder`` (default ``pretrain_models/``), or
    ``None``. ``model_name``: the config's ``MODEL_NAME`` (e.g. ``DeAOTT``), read from the
    model config when not given. File names are compared case-insensitively."""
    folder = PRETRAIN_DIR if folder is None else folder
    if not os.path.isdir(folder):
        return None
    if model_name is None:
        model_name = load_model_config(model_id).MODEL_NAME
    files = {f.lower(): f for f in os.listdir(folder)}
    names = [f'{model_name}_{stage}.pth' for stage in RELEASE_STAGES]
    if model_id in SHIPPED_WEIGHTS:
        names.append(SHIPPED_WEIGHTS[model_id])
    for name in names:
        if name.lower() in files:
            return os.path.join(folder, files[name.lower()])
    return None


def expected_files(model_id, model_name):
    """The file names :func:`find_checkpoint` looks for, for messages."""
    names = [f'{model_name}_{s}.pth' for s in RELEASE_STAGES[:2]]
    if model_id in SHIPPED_WEIGHTS:
        names.append(SHIPPED_WEIGHTS[model_id])
    return names
