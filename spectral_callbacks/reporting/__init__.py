"""Where the numbers go: TensorBoard layouts, histograms and figures."""
