from setuptools import find_packages, setup

setup(
    name='aot-gda',
    version='0.1.0',
    description='AOT/DeAOT video object segmentation with Gated Deformable Attention and '
                'label-free distillation (checkpoint-compatible with aot-benchmark)',
    packages=find_packages(include=['configs', 'configs.*', 'networks', 'networks.*',
                                    'dataloaders', 'dataloaders.*', 'kd', 'kd.*',
                                    'utils', 'utils.*', 'tools', 'tools.*']),
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.1,<2.14',
        'numpy>=1.23',
        'opencv-python-headless>=4.7',
        'pillow>=9.0',
        'scikit-image>=0.20',
        'tqdm>=4.60',
    ],
    extras_require={
        'test': ['pytest>=7', 'onnx>=1.15', 'onnxruntime>=1.17'],
        'tb': ['tensorboard>=2.10'],
        # tools/export_onnx.py and VideoObjectSegmenter(..., backend='onnxruntime')
        'onnx': ['onnx>=1.15', 'onnxruntime>=1.17'],
    },
)
