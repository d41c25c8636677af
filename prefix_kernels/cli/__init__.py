"""The command line, `python -m prefix_kernels`: the environment report and one layer compared with Hugging Face
(`report.py`), the training demo (`demo.py`), their argument types (`args.py`), and the peak-memory measurement
they and the benchmarks use (`memory.py`).
"""
