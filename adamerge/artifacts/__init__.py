"""What a run writes: atomic files, the exported merged model, coefficient plots."""
