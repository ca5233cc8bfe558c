"""prisma_mm.train"""
