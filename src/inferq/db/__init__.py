"""Database access: the pool, migrations, one repository per table, channel names."""
