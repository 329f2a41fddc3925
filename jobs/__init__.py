"""Ray job entry points (`ray job submit -- python jobs/protect.py --config ...`)."""
