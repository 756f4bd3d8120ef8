"""Domain services: functions over a Session. They flush but never commit."""
