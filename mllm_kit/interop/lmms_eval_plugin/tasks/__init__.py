"""Task YAML files placed here are found by lmms-eval when ``LMMS_EVAL_PLUGINS`` names this plugin (none ship yet)."""
