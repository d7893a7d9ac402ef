"""Network code copied from bone3d by bone3d export."""
