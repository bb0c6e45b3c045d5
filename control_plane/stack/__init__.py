"""The local stack: every process under supervisord, state under one directory."""
