"""Translation pipeline: SentencePiece, bidirectional RNN encoder, attention decoder, TFLite."""
