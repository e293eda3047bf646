"""vitlabel: batch image labelling on Ray."""
