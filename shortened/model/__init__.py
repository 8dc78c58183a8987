"""What a model is: the family table and geometry, loading, block removal, checkpoint writing."""
