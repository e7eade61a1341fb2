"""Quality evaluation: dialogue -> note pairs, ROUGE and section scores, stored results, the promotion gate.

``dataset`` reads JSONL rows (shared with ``bench --dataset``), ``scoring`` scores one note
against its reference, ``runner`` sends the requests to a server, ``results`` keeps the
documents under ``$MLSERVE_HOME/evals/NAME/VERSION/`` and ``gate`` refuses a promotion on them.
"""
