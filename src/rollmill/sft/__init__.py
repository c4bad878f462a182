"""Supervised fine-tuning pieces: conversations from the task or a chat file, assistant-token loss masks
from the chat template, sequence packing and the token loss. `rollmill.runtime.sft` runs them."""

from rollmill.sft.data import load_chat, prompt_chat, read_conversations, task_conversation
from rollmill.sft.masks import TemplateError, assistant_spans, tokenize_conversation
from rollmill.sft.packing import PackedBatch, Tokenized, collate, pack_rows, packed_batches, reply_logits, token_nll

__all__ = ["PackedBatch", "TemplateError", "Tokenized", "assistant_spans", "collate", "load_chat", "pack_rows",
           "packed_batches", "prompt_chat", "read_conversations", "reply_logits", "task_conversation", "token_nll",
           "tokenize_conversation"]
