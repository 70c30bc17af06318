"""babyllama: rebuild llama2.c from nothing. Train Llama 2 in PyTorch, export it to llama2.c's
files, run it in NumPy and in a C/OpenMP kernel. One module per chapter of the book:

    tokenizer (01), model (02), train (03), export (04), inference_numpy (05), fast_c (06)
"""

__version__ = "0.1.0"
